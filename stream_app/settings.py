"""The one settings object: every knob of the engine, read from the environment here only.

Nothing else in the package reads ``os.environ``. A wrong value stops start-up with
a :class:`~stream_app.errors.ConfigError` that names the environment variable.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from stream_app.errors import ConfigError

DEV_PII_SALT = "dev-only-salt-change-me"


class Settings(BaseSettings):
    """Engine configuration. Every field is an environment variable of the same name in capitals."""

    model_config = SettingsConfigDict(frozen=True, extra="ignore", case_sensitive=False)

    # --- Kafka -------------------------------------------------------------------------
    kafka_bootstrap_servers: str | None = Field(
        None,
        description="host:port[,host:port]. Unset: only `stream-app demo` works (embedded broker).",
    )
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    kafka_ssl_cafile: Path | None = None
    kafka_ssl_certfile: Path | None = None
    kafka_ssl_keyfile: Path | None = None
    kafka_session_timeout_seconds: float = Field(
        6.0, ge=1, le=300, description="Consumer-group session timeout; also how long a join waits."
    )
    data_dir: Path = Field(
        Path(tempfile.gettempdir()) / "stream-app",
        description="Faust's local data directory (no state of ours lives there; Redis is the store).",
    )
    kafka_fetch_max_wait_ms: int = Field(
        40,
        ge=1,
        le=10_000,
        description="Longest a fetch waits for data; Faust hard-codes 1500 ms, which is latency.",
    )
    kafka_fetch_min_bytes: int = Field(
        16384,
        ge=1,
        le=10 * 1024 * 1024,
        description="Bytes a fetch asks the broker to gather (or wait KAFKA_FETCH_MAX_WAIT_MS): fewer, "
        "fuller fetches of live traffic cost less CPU.",
    )
    app_id: str = Field("onboarding-engine", min_length=1, description="Faust app id = consumer group.")
    topic_events: str = "onboarding.events"
    topic_dlq: str = "onboarding.events.dlq"
    topic_triggers: str = "onboarding.triggers"
    topic_triggers_holdout: str = "onboarding.triggers.holdout"
    topic_segments: str = "onboarding.segments"
    topic_webhook_dlq: str = "onboarding.triggers.webhooks.dlq"

    # --- Redis -------------------------------------------------------------------------
    redis_url: str | None = Field(
        None, description="redis://, rediss:// or unix:// URL of the profile store."
    )
    redis_cluster: bool = Field(False, description="Talk the Redis Cluster protocol to REDIS_URL.")
    redis_key_prefix: str = Field("oe", min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    redis_timeout_seconds: float = Field(5.0, gt=0, description="Socket timeout of Redis calls.")
    batch_attempt_timeout_seconds: float = Field(
        30.0, gt=0, description="A batch attempt taking longer is cancelled and retried (idempotent)."
    )
    redis_retry_max_seconds: float = Field(10.0, gt=0, description="Cap of the retry back-off on outages.")

    # --- Web -----------------------------------------------------------------------------
    web_host: str = "127.0.0.1"
    web_port: int = Field(6066, ge=1, le=65535)
    api_tokens: SecretStr | None = Field(
        None,
        description="Comma-separated bearer tokens; when set, /profiles and /stats need "
        "`Authorization: Bearer <token>`. Required when WEB_HOST is not a loopback address.",
    )
    ready_max_retry_seconds: float = Field(
        30.0, gt=0, description="/readyz fails once a batch has been failing and retrying this long."
    )
    shutdown_timeout_seconds: float = Field(
        20.0,
        gt=0,
        le=300,
        description="On SIGTERM the worker exits within this long, also with the broker or Redis gone "
        "(an unfinished batch is abandoned: it is redelivered and applied once).",
    )

    # --- Processing ------------------------------------------------------------------------
    batch_max_events: int = Field(2000, ge=1, le=100_000)
    accept_redis_state: bool = Field(
        False,
        description="Start even though Redis has no epoch marker for partitions this group has "
        "committed offsets for (after an upgrade from a version without markers, or to knowingly "
        "accept a Redis that lost data); the missing markers are written.",
    )
    batch_permanent_attempts: int = Field(
        3,
        ge=1,
        le=20,
        description="Attempts of a batch failing with an error that is not an outage before the "
        "records causing it are isolated and parked on the dead-letter topic.",
    )
    step_stats_max_rows: int = Field(
        5000,
        ge=10,
        description="Step statistics rows (flow x step x group) kept in total; durations of further "
        "new steps are counted in onboarding_input_bounded_total and not kept.",
    )
    batch_window_seconds: float = Field(0.05, gt=0, le=10)
    max_event_bytes: int = Field(64 * 1024, ge=1024, le=10 * 1024 * 1024)
    max_future_skew_seconds: float = Field(
        86_400, ge=0, description="Events further in the future are invalid."
    )
    dedup_window_seconds: int = Field(
        7 * 86_400,
        ge=60,
        description="How long a messageId is remembered at least (up to twice while the user stays active).",
    )
    profile_ttl_seconds: int = Field(180 * 86_400, ge=60, description="Profiles idle this long expire.")
    profile_cache_size: int = Field(
        20_000, ge=0, description="Profiles a worker keeps in memory to skip re-reading them (0: off)."
    )
    profile_cache_mb: float = Field(
        32, ge=0, description="Cap of the serialized documents in that cache, in MiB (0: off)."
    )
    profile_compression: bool = Field(
        True,
        description="Store profile documents deflated (about a third of the bytes; ~35 us of CPU per "
        "write, ~9 us per read). Documents read either way, so it can be switched at any time.",
    )
    session_gap_seconds: int = Field(30 * 60, ge=1, description="Inactivity that starts a new session.")
    pii_hash_salt: SecretStr = Field(SecretStr(DEV_PII_SALT), description="Salt of the email/phone hashes.")

    traits_policy_file: Path | None = Field(
        None, description="Traits policy TOML: keep / hash / drop by name (default: config/traits.toml)."
    )

    # --- Identity ---------------------------------------------------------------------------------
    identity_blocked_ids: str | None = Field(
        None,
        description="Comma-separated placeholder ids treated as absent (case-insensitive); unset: "
        "the defaults (null, undefined, 0, anonymous, [object Object], ...). Blank ids always are.",
    )
    identity_max_merged_ids: int = Field(
        50, ge=1, le=10_000, description="Ids that may be folded into one profile; further links are refused."
    )
    identity_merge_identified: bool = Field(
        False, description="Allow identify/alias to absorb a profile that has its own userId history."
    )

    # --- Segments -------------------------------------------------------------------------------
    segments_file: Path | None = Field(
        None, description="Rule segments TOML (default: config/segments.toml)."
    )
    segments_max: int = Field(20, ge=1, le=200, description="Cap on the number of segments.")

    # --- Lifecycle thresholds ----------------------------------------------------------------
    lifecycle_active_min_sessions: int = Field(3, ge=1)
    lifecycle_dormant_after_days: float = Field(30, gt=0)
    lifecycle_churned_after_days: float = Field(90, gt=0)

    # --- Triggers ------------------------------------------------------------------------------
    triggers_file: Path | None = Field(
        None, description="Trigger types, actions, cooldowns, holdout (default: config/triggers.toml)."
    )
    stall_multiplier: float | None = Field(
        None, ge=1, description="Stalled after this x the step's mean completion time (file default 2)."
    )
    stall_min_samples: int | None = Field(
        None, ge=1, description="Completions a step needs before its own mean is used."
    )
    stall_default_mean_seconds: float | None = Field(
        None, gt=0, description="Mean assumed for steps with too few samples."
    )
    stall_min_threshold_seconds: float | None = Field(None, ge=0, description="Lower clamp of the threshold.")
    stall_max_threshold_seconds: float | None = Field(None, gt=0, description="Upper clamp of the threshold.")
    timer_interval_seconds: float = Field(
        0.25, gt=0, le=60, description="How often the worker looks for due deadlines."
    )
    baseline_refresh_seconds: float = Field(
        5.0, gt=0, description="How often step statistics are re-read for stall thresholds."
    )

    # --- Clustering ----------------------------------------------------------------------------
    cluster_enabled: bool = Field(True, description="Assign users to behaviour clusters (river KMeans).")
    cluster_k: int = Field(4, ge=2, le=20, description="Number of clusters.")
    cluster_min_samples: int = Field(
        200, ge=10, description="Users in the sample set needed before the first model."
    )
    cluster_train_interval_seconds: float = Field(
        10.0, gt=0, description="How often the worker holding the training lease trains and publishes."
    )
    cluster_samples_per_batch: int = Field(
        100, ge=0, description="Profiles per batch whose latest features go to the sample set."
    )
    cluster_sample_cap: int = Field(
        50_000, ge=100, description="Users kept in the training sample set (random eviction beyond)."
    )
    cluster_train_samples: int = Field(
        5000, ge=10, description="Vectors drawn from the sample set for each training pass."
    )
    cluster_margin: float = Field(
        0.2, ge=0, lt=1, description="Hysteresis: another centroid must be this much closer to move a user."
    )
    cluster_sweep_rate: float = Field(
        1000.0,
        gt=0,
        description="Profiles per second a worker re-checks against a new cluster model (users who "
        "send nothing more still get their cluster); bounds the sweep's share of the worker.",
    )
    cluster_sweep_min_change: float = Field(
        0.01,
        ge=0,
        le=1,
        description="A new model version starts a sweep only if it would move at least this share of "
        "the training sample's users (beyond the hysteresis margin); the first model always does.",
    )
    cluster_halflife: float = Field(
        0.02, gt=0, le=1, description="river KMeans halflife (step of online updates)."
    )

    # --- Collector (stream-app collector) ---------------------------------------------------
    collector_host: str = Field("127.0.0.1", description="Address the HTTP collector binds.")
    collector_port: int = Field(8088, ge=1, le=65535, description="Port of the HTTP collector.")
    collector_write_keys: SecretStr | None = Field(
        None,
        description="Comma-separated write keys the collector accepts; `source=key` names the key's "
        "source, recorded on its events as context.source.",
    )
    collector_allow_anonymous: bool = Field(
        False, description="Accept requests without a known write key (the demo only)."
    )
    collector_allowed_origins: str = Field(
        "",
        description="Comma-separated browser origins allowed by CORS (e.g. https://app.example.com); "
        "`*` allows any. Requests from other origins are refused.",
    )
    collector_produce_timeout_seconds: float = Field(
        10.0,
        gt=0,
        le=300,
        description="How long a request waits for the broker's acknowledgement before 503.",
    )
    collector_max_in_flight: int = Field(
        1000, ge=1, description="Requests handled at once; more get 503 with Retry-After."
    )
    collector_shutdown_seconds: float = Field(
        10.0, gt=0, le=120, description="On SIGTERM: time for in-flight requests and the producer flush."
    )

    # --- Personalization (GET /v1/personalization, the recommender) ------------------------------
    personalization_file: Path | None = Field(
        None,
        description="Checklists, flags and recommendation settings (default: config/personalization.toml).",
    )
    personalization_user_hash_secret: SecretStr | None = Field(
        None,
        description="When set, a decision request must carry userHash = hex HMAC-SHA256(secret, userId "
        "or anonymousId), computed by your backend: the write key alone then reads nobody's decision.",
    )
    personalization_cache_size: int = Field(
        10_000,
        ge=0,
        description="Decisions the collector keeps per user, reused while the profile is unchanged.",
    )
    personalization_refresh_seconds: float = Field(
        2.0, gt=0, le=300, description="How often the collector checks for a newer recommender model."
    )
    reco_enabled: bool = Field(True, description="Learn next-feature recommendations (the workers).")
    reco_train_interval_seconds: float = Field(
        30.0, gt=0, description="How often the worker holding the recommender's lease retrains it."
    )
    reco_samples_per_batch: int = Field(
        200, ge=0, description="Profiles per batch whose adoption order goes to the recommender's sample set."
    )
    reco_sample_cap: int = Field(
        50_000, ge=100, description="Users in the recommender's sample set (random eviction beyond)."
    )
    reco_train_samples: int = Field(
        20_000, ge=10, description="Adoption orders drawn from the sample set for each training pass."
    )

    # --- Webhook delivery (stream-app deliver) ---------------------------------------------------
    webhooks_file: Path | None = Field(
        None, description="Webhook endpoints TOML (see config/webhooks.example.toml); `deliver` needs it."
    )
    deliver_host: str = Field(
        "127.0.0.1", description="Where `stream-app deliver` serves /metrics and /healthz."
    )
    deliver_port: int = Field(8090, ge=0, le=65535)
    deliver_batch: int = Field(100, ge=1, le=10_000, description="Triggers delivered per commit.")

    # --- Logging ------------------------------------------------------------------------------
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["json", "console"] = "json"

    @field_validator("kafka_bootstrap_servers")
    @classmethod
    def _check_bootstrap(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        for part in value.split(","):
            host, sep, port = part.strip().rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"{part!r} is not host:port")
        return value

    @field_validator("redis_url")
    @classmethod
    def _check_redis_url(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        scheme = urlparse(value).scheme
        if scheme not in ("redis", "rediss", "unix"):
            raise ValueError(f"scheme {scheme!r} is not redis, rediss or unix")
        return value

    @model_validator(mode="after")
    def _check_consistency(self) -> Settings:
        if self.kafka_security_protocol.startswith("SASL_") and not (
            self.kafka_sasl_mechanism and self.kafka_sasl_username and self.kafka_sasl_password
        ):
            raise ValueError(
                "KAFKA_SECURITY_PROTOCOL SASL_* needs KAFKA_SASL_MECHANISM, "
                "KAFKA_SASL_USERNAME and KAFKA_SASL_PASSWORD"
            )
        if self.lifecycle_churned_after_days <= self.lifecycle_dormant_after_days:
            raise ValueError("LIFECYCLE_CHURNED_AFTER_DAYS must exceed LIFECYCLE_DORMANT_AFTER_DAYS")
        k = self.cluster_k
        for name, value in (
            ("CLUSTER_MIN_SAMPLES", self.cluster_min_samples),
            ("CLUSTER_TRAIN_SAMPLES", self.cluster_train_samples),
        ):
            if value < k:
                raise ValueError(f"{name} ({value}) must be at least CLUSTER_K ({k})")
        if self.cluster_sample_cap < self.cluster_min_samples:
            raise ValueError(
                "CLUSTER_SAMPLE_CAP must be at least CLUSTER_MIN_SAMPLES, or no model is ever trained"
            )
        return self

    def require_services(self) -> tuple[str, str]:
        """Return (bootstrap servers, redis url) or stop with an error naming what is missing."""
        if not self.kafka_bootstrap_servers:
            raise ConfigError(
                "KAFKA_BOOTSTRAP_SERVERS", "not set; point it at a broker or run `stream-app demo`"
            )
        if not self.redis_url:
            raise ConfigError("REDIS_URL", "not set; point it at Redis or run `stream-app demo`")
        return self.kafka_bootstrap_servers, self.redis_url

    @classmethod
    def load(cls, **overrides: Any) -> Settings:
        """Read the environment (plus explicit overrides) and validate, naming a bad variable."""
        try:
            return cls(**overrides)
        except ValidationError as exc:
            first = exc.errors()[0]
            message = str(first.get("msg", "invalid")).removeprefix("Value error, ")
            if first.get("loc"):
                name = str(first["loc"][0]).upper()
            else:  # a check across settings: its message names them; the first is the culprit
                named = re.search(r"\b[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+\b", message)
                name = named.group(0) if named else "settings"
            raise ConfigError(name, message) from exc
