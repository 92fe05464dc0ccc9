"""Runtime: every setting of autotp in one frozen value, read from the environment here only.

``Runtime.from_env()`` reads the ``AUTOTP_*`` variables once; the entry points (``shard``,
``plan``, ``save_sharded``, ``from_pretrained``, the console scripts) take ``runtime=`` and pass
it down, so nothing below them looks at the environment and two configurations can run in one
process. This module is also the one place that touches the process environment otherwise
(torchrun's variables, the build's PATH).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

KERNEL_MODES = ("auto", "native", "torch")
COMM_MODES = ("auto", "shm", "torch")
ATTENTION_MODES = ("auto", "sdpa")
INT8_ACTIVATION_MODES = ("int16", "int8")  # INT8 layers' activations on the native kernels
# instruction sets the native code may use, lowest first; "auto" takes the best the CPU has
ISAS = ("generic", "avx2", "avx512", "avx512_vnni", "avx512_bf16", "amx")
ISA_CHOICES = ("auto", *ISAS)
DEFAULT_COMM_TIMEOUT_S = 300.0

# field -> the environment variable it is read from (README: "Settings")
ENV_NAMES = {
    "kernels": "AUTOTP_KERNELS",
    "isa": "AUTOTP_ISA",
    "comm": "AUTOTP_COMM",
    "comm_timeout_s": "AUTOTP_COMM_TIMEOUT",
    "host_id": "AUTOTP_HOST_ID",
    "comm_portable": "AUTOTP_COMM_PORTABLE",
    "verbose_build": "AUTOTP_VERBOSE_BUILD",
    "portable_build": "AUTOTP_PORTABLE_BUILD",
    "compile": "AUTOTP_COMPILE",
    "attention": "AUTOTP_ATTENTION",
    "huge_pages": "AUTOTP_HUGE_PAGES",
    "int8_activations": "AUTOTP_INT8_ACTIVATIONS",
    "merge_siblings": "AUTOTP_MERGE_SIBLINGS",
}
# the Runtime fields that take one of a few words, with those words (the first is the default)
CHOICE_FIELDS = (("kernels", KERNEL_MODES), ("isa", ISA_CHOICES), ("comm", COMM_MODES),
                 ("attention", ATTENTION_MODES), ("int8_activations", INT8_ACTIVATION_MODES))
LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class Runtime:
    """The settings one call of autotp runs with.

    kernels         ``auto``: native GEMMs where they run, else torch (said once); ``native``:
                    an error where they cannot run; ``torch``: always ``F.linear``.
    isa             the highest instruction set native code may use: ``auto`` (the best the
                    CPU has), ``amx``, ``avx512_bf16``, ``avx512_vnni``, ``avx512``, ``avx2``, or
                    ``generic``
                    (portable code only; its GEMM
                    is the spec the others are checked against and runs only with
                    ``kernels="native"``, so ``auto`` kernels then run on torch).
    comm            ``auto``: shared-memory all-reduce when every rank is on this host, else
                    torch.distributed; ``shm``: an error where shared memory cannot be used;
                    ``torch``: always torch.distributed.
    comm_timeout_s  how long a rank waits in a shared-memory all-reduce for the others.
    host_id         names this machine for the shared-memory check (None: hostname and boot id);
                    ranks with different ids never share memory.
    comm_portable   the shared-memory all-reduce sums with portable code (also on with
                    ``isa="generic"``).
    verbose_build   show the compiler's output when the extension is built.
    portable_build  build the extension from its portable code only (no x86 tables, as on a CPU
                    architecture without them), under its own name; the first build a process
                    loads is the one it keeps.
    compile         ``generate`` decodes with a static KV cache and a ``torch.compile``d
                    forward (autotp.sharding.decode); the prompt's forward stays eager.
    attention       ``auto``: a model on transformers' SDPA attention decodes with autotp's
                    attention function (autotp.sharding.attention); ``sdpa``: leave it on SDPA.
    huge_pages      the weights a decoding step streams are moved onto transparent huge pages
                    where the OS offers them (autotp.kernels.pages); off: left where they are.
    int8_activations how the native INT8 GEMM takes its activations, per row and segment of
                    at most 256 inputs (autotp.kernels.linear_int8): ``int16`` (within
                    max |x| / 65534: nearly the bf16 product) or ``int8`` (within max |x| / 254,
                    coarser; AVX512-VNNI multiplies bytes, twice the products per instruction:
                    faster where a GEMM computes rather than streams, as beam search and
                    prompts do). Layers on torch kernels are not affected.
    merge_siblings  column-parallel layers on the native kernels that read the same input
                    (query, key and value; gate and up) multiply as one GEMM, their packed
                    weights laid out in one buffer (autotp.sharding.siblings); off: each alone.
    """

    kernels: str = "auto"
    isa: str = "auto"
    comm: str = "auto"
    comm_timeout_s: float = DEFAULT_COMM_TIMEOUT_S
    host_id: str | None = None
    comm_portable: bool = False
    verbose_build: bool = False
    portable_build: bool = False
    compile: bool = False
    attention: str = "auto"
    huge_pages: bool = True
    int8_activations: str = "int16"
    merge_siblings: bool = True

    def __post_init__(self) -> None:
        for name, choices in CHOICE_FIELDS:
            if getattr(self, name) not in choices:
                raise ValueError(f"autotp: Runtime({name}={getattr(self, name)!r}) is not one of "
                                 f"{', '.join(choices)} (environment variable {ENV_NAMES[name]})")
        if not isinstance(self.comm_timeout_s, (int, float)) or not self.comm_timeout_s > 0:
            raise ValueError(f"autotp: Runtime(comm_timeout_s={self.comm_timeout_s!r}) must be a positive number "
                             f"of seconds (environment variable {ENV_NAMES['comm_timeout_s']})")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "Runtime":
        """The runtime the ``AUTOTP_*`` variables of ``environ`` (default: this process's
        environment) describe; unset or empty variables take the defaults. A value that is not
        one of the choices is an error naming the variable."""
        env = os.environ if environ is None else environ
        raw = {field: env.get(var, "").strip() for field, var in ENV_NAMES.items()}
        values: dict[str, object] = {}
        for field, choices in CHOICE_FIELDS:
            value = raw[field].lower() or choices[0]
            if value not in choices:
                raise ValueError(f"autotp: {ENV_NAMES[field]}={value!r} is not one of {', '.join(choices)}")
            values[field] = value
        if raw["comm_timeout_s"]:
            try:
                values["comm_timeout_s"] = float(raw["comm_timeout_s"])
            except ValueError:
                raise ValueError(f"autotp: {ENV_NAMES['comm_timeout_s']}={raw['comm_timeout_s']!r} is not a number "
                                 "of seconds") from None
            if not values["comm_timeout_s"] > 0:
                raise ValueError(f"autotp: {ENV_NAMES['comm_timeout_s']} must be positive, got {raw['comm_timeout_s']}")
        values["host_id"] = raw["host_id"] or None
        for field in ("comm_portable", "verbose_build", "portable_build", "compile"):
            if raw[field] not in ("", "0", "1"):
                raise ValueError(f"autotp: {ENV_NAMES[field]}={raw[field]!r} must be 0 or 1")
            values[field] = raw[field] == "1"
        if raw["huge_pages"] not in ("", "0", "1"):
            raise ValueError(f"autotp: {ENV_NAMES['huge_pages']}={raw['huge_pages']!r} must be 0 or 1")
        values["huge_pages"] = raw["huge_pages"] != "0"
        if raw["merge_siblings"] not in ("", "0", "1"):
            raise ValueError(f"autotp: {ENV_NAMES['merge_siblings']}={raw['merge_siblings']!r} must be 0 or 1")
        values["merge_siblings"] = raw["merge_siblings"] != "0"
        return cls(**values)  # type: ignore[arg-type]

    def replace(self, **changes: object) -> "Runtime":
        """A copy with some fields changed (checked like a new Runtime)."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    def as_env(self) -> dict[str, str]:
        """The environment variables that give this runtime to a child process (a rank)."""
        env = {ENV_NAMES["kernels"]: self.kernels, ENV_NAMES["isa"]: self.isa, ENV_NAMES["comm"]: self.comm,
               ENV_NAMES["comm_timeout_s"]: repr(float(self.comm_timeout_s)),
               ENV_NAMES["comm_portable"]: "1" if self.comm_portable else "0",
               ENV_NAMES["verbose_build"]: "1" if self.verbose_build else "0",
               ENV_NAMES["portable_build"]: "1" if self.portable_build else "0",
               ENV_NAMES["compile"]: "1" if self.compile else "0", ENV_NAMES["attention"]: self.attention,
               ENV_NAMES["huge_pages"]: "1" if self.huge_pages else "0",
               ENV_NAMES["int8_activations"]: self.int8_activations,
               ENV_NAMES["merge_siblings"]: "1" if self.merge_siblings else "0"}
        if self.host_id:
            env[ENV_NAMES["host_id"]] = self.host_id
        return env


def resolve(runtime: Runtime | None) -> Runtime:
    """``runtime``, or the environment's when None (what every entry point does with ``runtime=``)."""
    return Runtime.from_env() if runtime is None else runtime


def missing_launch_variables() -> list[str]:
    """torchrun's variables that torch.distributed's env:// start needs and this process lacks."""
    return [k for k in LAUNCH_VARIABLES if k not in os.environ]


def put_on_path(folder: Path) -> None:
    """Put ``folder`` first on this process's PATH (for the tools a build runs, such as ninja)."""
    os.environ["PATH"] = f"{folder}{os.pathsep}{os.environ.get('PATH', '')}"


def launched_world() -> tuple[int, int]:
    """(rank, world size) as torchrun / autotp-run gave them to this process; (0, 1) when it
    was started directly."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
