"""Where the project's declarative files live (schemas, topics, config).

The engine is installed editable from a checkout (see README), so these are the
checkout's own folders; `STREAM_APP_HOME` points elsewhere for other layouts.
"""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(os.environ.get("STREAM_APP_HOME", Path(__file__).resolve().parents[1]))
SCHEMAS_DIR = ROOT / "schemas"
TOPICS_FILE = ROOT / "topics" / "topics.toml"
CONFIG_DIR = ROOT / "config"
