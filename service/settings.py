"""The service's settings: environment variables with the GEOSHARE_ prefix, read only here."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

from pydantic import AnyHttpUrl, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


def _default_concurrency() -> int:
    # half the cores: each solve may use CP-SAT threads of its own
    return max(1, (os.cpu_count() or 2) // 2)


def _split_list(value: object) -> object:
    # GEOSHARE_READ_ROOTS=/models,/data (commas; a JSON list works too); "" (compose's unset) is none
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            return json.loads(text)
        return [part.strip() for part in text.split(",") if part.strip()]
    return value


class AccessSettings(BaseSettings):
    """What analysis jobs may read, import and write (service/access.py applies it).

    The API checks each submitted job against its own copy and the worker checks it again against
    its own, as the two may run on different machines. Safe by default: no read roots, no modules.
    """

    model_config = SettingsConfigDict(env_prefix="GEOSHARE_", extra="ignore")

    read_roots: Annotated[list[Path], NoDecode] = Field(
        default_factory=list,
        description="Folders jobs may read models (Hugging Face directories) and data from, comma-separated "
                    "(none: only the packaged model 'minilm' and the built-in data).")
    out_root: Path = Field(Path("geoshare-out"),
                           description="Folder compress outputs go under; a relative compress.out is resolved in "
                                       "it (default: ./geoshare-out of the process).")
    model_modules: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Modules (or module:factory names) whose zero-argument factories jobs may name as "
                    "'module:factory', comma-separated (none by default).")

    @field_validator("read_roots", "model_modules", mode="before")
    @classmethod
    def _comma_list(cls, value: object) -> object:
        return _split_list(value)

    @field_validator("model_modules")
    @classmethod
    def _module_names(cls, value: list[str]) -> list[str]:
        from service.access import check_module_entry

        return [check_module_entry(entry) for entry in value]

    @field_validator("out_root", mode="before")
    @classmethod
    def _empty_out_root_is_default(cls, value: object) -> object:
        return "geoshare-out" if value is None or (isinstance(value, str) and not value.strip()) else value


class Settings(AccessSettings):
    """Everything the API server can be told; one object, handed to ``create_app``."""

    model_config = SettingsConfigDict(env_prefix="GEOSHARE_", extra="ignore")

    db_url: str = Field("sqlite:///geoshare.db", description="SQLAlchemy URL (SQLite file or Postgres).")
    api_key: SecretStr | None = Field(None, description="When set, /v1 needs 'Authorization: Bearer <key>'.")
    max_time_limit_s: float = Field(60.0, gt=0, description="Largest options.time_limit_s accepted.")
    max_layers: int = Field(512, gt=0, description="Largest number of layers in a problem.")
    max_body_bytes: int = Field(8 * 1024 * 1024, gt=0, description="Largest request body.")
    max_queue: int = Field(256, gt=0, description="Queued solves beyond which new ones get 429.")
    concurrency: int = Field(default_factory=_default_concurrency, gt=0, le=256,
                             description="Solver processes running at once.")
    solver_workers: int | None = Field(None, gt=0, le=64,
                                       description="CP-SAT threads per solve (default: cores / concurrency).")
    max_wait_s: float = Field(60.0, ge=0, description="Cap on how long a request may wait for its result.")
    lease_s: float = Field(60.0, gt=0, description="Default analysis lease; workers heartbeat within it.")
    max_lease_s: float = Field(600.0, gt=0)
    solve_lease_s: float = Field(30.0, gt=0, description="Lease a replica holds on a running solve.")
    max_attempts: int = Field(3, gt=0, description="Claims of one analysis before it fails for good.")
    analysis_time_limit_s: float = Field(30.0, gt=0, description="Time limit of the solve after an analysis.")
    requeue_on_start: bool | None = Field(
        None, description="Re-queue the store's running solves at start. Default: yes on a SQLite file (one "
        "server owns it, so whatever ran was this server's, before it stopped), no on a shared database such as "
        "Postgres (the running solves may be another replica's; expired leases come back through the reaper).")

    def requeues_on_start(self) -> bool:
        """Whether running solves found at start were this server's own (see ``requeue_on_start``)."""
        if self.requeue_on_start is not None:
            return self.requeue_on_start
        return self.db_url.startswith("sqlite")
    retry_after_s: int = Field(5, gt=0, description="Retry-After sent with 429.")
    poll_s: float = Field(1.0, gt=0, description="How often idle runners and the lease reaper look.")

    @field_validator("api_key", mode="before")
    @classmethod
    def _empty_key_is_none(cls, value: object) -> object:
        # compose passes GEOSHARE_API_KEY="" when the operator set none: that means no key
        return None if value == "" else value

    def cpu_workers(self) -> int:
        """CP-SAT threads for one solve, so that all running solves share the cores."""
        if self.solver_workers is not None:
            return self.solver_workers
        return max(1, (os.cpu_count() or 1) // self.concurrency)


class WorkerSettings(AccessSettings):
    """Settings of ``geoshare worker`` (the GPU analysis worker); flags override them."""

    model_config = SettingsConfigDict(env_prefix="GEOSHARE_", extra="ignore")

    api: AnyHttpUrl | None = Field(None, description="Base URL of the API, e.g. http://api:8000.")
    api_key: SecretStr | None = None
    worker_id: str | None = None
    poll_s: float = Field(2.0, gt=0)
    lease_s: float = Field(120.0, gt=0)

    @field_validator("api_key", "api", mode="before")
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        return None if value == "" else value
