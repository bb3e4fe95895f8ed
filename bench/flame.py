"""Sampling profiles of a running process with py-spy, summarised for RESULTS.md.

``record(pid, path)`` attaches py-spy to a process (no restart, no code change) and writes
collapsed stacks ("frame;frame;... count" per line); ``summary(path)`` turns them into the
functions where the samples are, inclusive (on the stack) and self (at the top of it), and
into coarse areas of the engine (``AREAS``), which is what a before/after comparison reads.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

#: what a sample was doing, by the first of these found anywhere on its stack (outermost
#: role first): a coroutine resumed by the event loop carries its callers, so a Redis reply
#: parsed for a batch counts as the batch's
ROLES: tuple[tuple[str, str], ...] = (
    ("BatchRunner._process_and_publish", "batch: other"),
    ("DeadlineTimer.", "deadline timer"),
    ("train_once", "cluster training (thread)"),
    ("generate_latest", "metrics scrape (/metrics)"),
    ("web_protocol.", "HTTP server"),
    ("sender.", "Kafka producer (aiokafka)"),
    ("streams.Stream.", "Kafka intake (Faust stream)"),
    ("consumer.", "Kafka intake (consumer)"),
    ("fetcher.", "Kafka intake (aiokafka fetcher)"),
    ("process_then_ack", "Kafka intake (ack)"),
    ("aiokafka", "Kafka client: other"),
    ("base_events.BaseEventLoop", "event loop: other"),
)

#: inside a batch, the part of the pipeline (first found from the innermost frame out)
BATCH_PARTS: tuple[tuple[str, str], ...] = (
    ("contract.parse_event", "batch: validate (parse_event)"),
    ("RedisProfileStore.save", "batch: profile save (encode, Lua)"),
    ("EventProcessor._load", "batch: profile load (decode)"),
    ("reactions.react", "batch: reactions (segments, clusters, triggers)"),
    ("profile.apply_event", "batch: fold events into profiles"),
    ("EventProcessor.process", "batch: pipeline other"),
    ("Publisher.", "batch: publish outputs"),
    ("ClusterService.sample", "batch: training samples"),
    ("sizes.", "batch: segment sizes"),
    ("deadlines.", "batch: deadlines"),
)

#: the worker's entry frames: on every stack of the main thread, they say nothing
ENTRY_POINTS = frozenset({"__main__.<module>", "cli.main", "cli._cmd_worker"})

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^():]+)(?::\d+)?\)$")


@dataclass
class Summary:
    samples: int
    idle: int  # samples with no Python frame running (py-spy --idle off: waiting in the loop)
    inclusive: Counter[str]
    own: Counter[str]
    areas: Counter[str]
    ours: set[str]  # functions of the engine (stream_app/, agents/)

    def table(self, top: int = 15) -> str:
        """Markdown: the engine's functions most on the stack, with their own share."""
        rows = ["| function (engine) | on the stack | own time |", "|---|---|---|"]
        ranked = [
            (name, count)
            for name, count in self.inclusive.most_common()
            if name in self.ours and name not in ENTRY_POINTS
        ]
        for name, count in ranked[:top]:
            rows.append(f"| `{name}` | {count / self.samples:.1%} | {self.own[name] / self.samples:.1%} |")
        return "\n".join(rows)

    def area_shares(self) -> dict[str, float]:
        return {name: count / self.samples for name, count in self.areas.most_common()}


def available() -> bool:
    return shutil.which("py-spy") is not None or (Path(sys.executable).parent / "py-spy").exists()


def record(pid: int, path: Path, rate: int = 97) -> subprocess.Popen[bytes]:
    """Start sampling ``pid`` into ``path`` (collapsed stacks); stop with :func:`stop`."""
    exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    return subprocess.Popen(
        [exe, "record", "--pid", str(pid), "--rate", str(rate), "--format", "raw", "--output", str(path),
         "--nonblocking"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip


def stop(proc: subprocess.Popen[bytes]) -> None:
    """Ask py-spy to write what it sampled (Ctrl-C) and wait for it."""
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


def _name(frame: str) -> tuple[str, str]:
    """``func (path/file.py:12)`` -> (``file.py:func`` shortened to the package, the path)."""
    found = _FRAME.match(frame)
    if found is None:
        return frame, frame
    path = found.group("file")
    for marker in ("stream_app/", "site-packages/", "python3.11/"):
        if marker in path:
            short = path.split(marker, 1)[1]
            break
    else:
        short = path.rsplit("/", 1)[-1]
    return f"{short.removesuffix('.py')}.{found.group('func')}", path


def _area(frames: list[tuple[str, str]]) -> str:
    names = [name for name, _path in frames]
    for marker, role in ROLES:
        if any(marker in name for name in names):
            if role == "batch: other":
                for part_marker, part in BATCH_PARTS:
                    if any(part_marker in name for name in names):
                        return part
            return role
    return "other (threads, interpreter)"


def summary(path: Path) -> Summary:
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    areas: Counter[str] = Counter()
    ours: set[str] = set()
    samples = idle = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        samples += count
        frames = [_name(f) for f in stack.split(";") if f and not f.startswith("process ")]
        frames = [f for f in frames if not f[0].startswith("thread ")]
        if not frames:
            idle += count
            continue
        for name, frame_path in set(frames):
            inclusive[name] += count
            if "stream_app/" in frame_path or "/agents/" in frame_path:
                ours.add(name)
        own[frames[-1][0]] += count
        areas[_area(frames)] += count
    return Summary(samples, idle, inclusive, own, areas, ours)


if __name__ == "__main__":
    s = summary(Path(sys.argv[1]))
    print(f"{s.samples} samples")
    print(s.table(int(sys.argv[2]) if len(sys.argv) > 2 else 25))
    for name, share in s.area_shares().items():
        print(f"{share:6.1%}  {name}")
