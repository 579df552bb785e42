"""The quantization config: every field, its default, the values it may take, and its typed form.

Config files (`configs/*.py`) define `get_config()` returning `default_config()` with their model's
settings; the CLI applies `--config.field=value` overrides on top and `run_config` validates the
result (anything unknown or out of range is refused with the allowed values in the message) and
turns it into a frozen `RunConfig`, the only form the run machinery and the method ever see.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ml_collections

from bitsmoe_jax.method.config import FIELDS as METHOD_FIELDS
from bitsmoe_jax.method.config import MethodConfig
from bitsmoe_jax.method.decompose import BASIS_BITS
from bitsmoe_jax.parallel.distributed import DistributedConfig

METHODS = ("bitsmoe", "rtn", "rtn_asym", "gptq", "gptq_asym", "expertwise", "kquant")
ALLOCATORS = ("auto", "milp", "greedy")
SCOPES = ("auto", "model", "layer")
COEFF_MODES = ("exact", "sampled")
ROUNDINGS = ("gptq", "nearest")
DENSE_DTYPES = ("bfloat16", "float16", "float32")
PREFLIGHTS = ("values", "headers", "off")
VALID_BITS = (0, 1, 2, 3, 4, 5, 6, 7, 8, 16)


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.model_path = ""  # HF directory or converted checkpoint
    c.output_dir = ""
    c.overwrite = False
    # Finished layers are committed to work_dir ("" = OUTPUT_DIR.partial beside the output); a rerun
    # of the same command resumes at the first unfinished layer. resume=False discards the work dir.
    c.resume = True
    c.work_dir = ""
    c.method = "bitsmoe"
    c.budget_bits = (
        2.0,
    )  # bits per original expert weight, everything stored counted; several -> one output each
    # model: one allocation over every MoE layer (two passes over the layers, run/model_scope.py);
    # layer: each MoE layer meets the budget on its own; auto: model when that one allocation is
    # small enough to hold (run/model_scope.resolve_scope: by the model's size alone), else layer
    c.budget_scope = "auto"
    c.calib_text = "shakespeare_train"  # shipped name or path
    # directory with the tokenizer.json the texts are tokenized with ("" = the model's own)
    c.tokenizer = ""
    c.num_calib_tokens = 16384
    c.seq_len = 256
    c.sequential = True  # inputs of layer i come from layers < i already quantized
    c.min_tokens = 16  # experts routed fewer calibration tokens use the documented fallback
    c.expert_mass_floor = 0.25
    c.candidate_bits = (0, 1, 2, 3, 4, 5, 6, 8)
    c.group_size = 128
    c.basis = "svd"  # svd | whitened | none (ablations: activation-whitened basis; no shared basis)
    c.loss_weighting = (
        "token_sum"  # token_sum | expert_mean (ablation: per-expert means drop routing frequency)
    )
    c.basis_bits = 4  # 4, 6 (bit-plane words), 8 (int8) with bf16 row scales; or 16 (bf16)
    # e.g. (4, 6, 8): each layer's bases at the precision whose allocation predicts the least loss
    c.basis_bits_choices = ()
    # stored: budget_bits counts every stored bit; decode: the bits a batch-1 decode step reads per
    # routed expert weight (bases count E/k times; storage is then below the budget too)
    c.budget_counts = "stored"
    c.rank = ml_collections.FieldReference(None, field_type=int)  # None = full rank
    c.coefficient_mode = "exact"  # exact | sampled (kappa_b * ||unit||^2)
    # gptq: gate/up factor rows rounded with GPTQ error feedback in component space (same bits, same
    # format; method/error_feedback.py); nearest: every unit rounded on its own.
    c.rounding = "gptq"
    # Adam steps fitting each expert's factor group scales to its routed output after rounding
    # (codes and bits fixed; 0 = off; needs rounding=gptq); method/expert_scale_tuning.py
    c.scale_tuning_steps = 50
    c.scale_tuning_lr = 0.02
    c.scale_tuning_batch = 512
    c.allocator = "auto"
    c.milp_max_units = 10000
    c.milp_time_limit = 60.0
    # expert indices kept at super_expert_bits in every MoE layer, or "auto" (any type: a tuple or a
    # string)
    c.super_experts = ml_collections.FieldReference((), field_type=object)
    c.super_expert_bits = 8
    c.super_expert_threshold = 8.0  # "auto": peak |output| above this x the median expert's
    c.dense_dtype = "bfloat16"  # storage of non-expert weights
    c.eval_text = "shakespeare_test"  # "" to skip evaluation
    c.eval_max_tokens = ml_collections.FieldReference(None, field_type=int)
    c.eval_batch_size = 8
    c.seed = 0
    # Devices on the "expert" mesh axis that per-expert work is sharded over: () = every device.
    c.mesh_shape = ml_collections.FieldReference((), field_type=object)
    # Memory: experts are streamed through every stage a chunk at a time. host_memory_gb sizes the
    # chunk (None = the memory available when the run starts); expert_chunk sets it directly
    # (experts per device). Neither changes the output.
    c.host_memory_gb = ml_collections.FieldReference(None, field_type=float)
    c.expert_chunk = ml_collections.FieldReference(None, field_type=int)
    # Before any work: every tensor present with the shape config.json implies ("headers"), and
    # also free of NaN/Inf ("values": one extra read of the weight files); "off" skips it.
    c.preflight = "values"
    c.distributed = distributed_config()
    return c


def distributed_config() -> ml_collections.ConfigDict:
    """`jax.distributed.initialize` settings (bitsmoe_jax/distributed.py); the defaults are one
    process."""
    d = ml_collections.ConfigDict()
    d.auto = False  # True on a TPU pod (or SLURM / Open MPI): JAX detects coordinator, count and id
    d.coordinator_address = ""  # "host:port" of process 0, for explicit multi-process (GPU hosts)
    d.num_processes = 1
    d.process_id = 0
    d.initialization_timeout = 300  # s to wait for every process to join before a clear error
    d.heartbeat_timeout = 100  # s of silence after which a peer is declared dead and the run stops
    # s a process waits at a barrier for a peer that is alive but stuck (a dead one fails it after
    # heartbeat_timeout); the last barrier waits while process 0 writes and evaluates every output
    d.barrier_timeout = 7200.0
    return d


# One line per field for `python -m bitsmoe_jax.quantize --help` (docs/quantizing.md says more).
FIELD_HELP: dict[str, str] = {
    "model_path": "Hugging Face directory (config.json, safetensors or .bin) or converted model",
    "output_dir": "where the quantized checkpoint goes (one bpw_X.XX/ per budget when several)",
    "overwrite": "replace an existing output directory (False: refuse to)",
    "resume": "continue from the work directory's committed layers (False: start over)",
    "work_dir": 'committed layers of an unfinished run ("": OUTPUT_DIR.partial)',
    "method": "bitsmoe, or a baseline: " + ", ".join(m for m in METHODS if m != "bitsmoe"),
    "budget_bits": "bits per original expert weight, every stored bit counted; several: one each",
    "budget_scope": (
        "model (one allocation overall), layer (each MoE layer meets the budget) or auto (model "
        "when its allocation is small enough, else layer)"
    ),
    "calib_text": "calibration text: a .txt/.txt.gz path or a shipped name",
    "tokenizer": 'directory with tokenizer.json for the texts ("": the model\'s own)',
    "num_calib_tokens": "calibration tokens (windows of seq_len)",
    "seq_len": "calibration window length in tokens",
    "sequential": "calibrate layer i on the outputs of the already quantized layers before it",
    "min_tokens": "experts routed fewer calibration tokens are calibrated on every token",
    "expert_mass_floor": "floor on an expert's loss weight, as a fraction of the mean expert's",
    "candidate_bits": "bit-widths a spectral component may get (0 = dropped, 16 = bf16)",
    "group_size": "values per bf16 scale of the factors",
    "basis": "svd (shared basis from the weights), whitened or none (ablations)",
    "loss_weighting": "token_sum (routing frequency counts) or expert_mean (ablation)",
    "basis_bits": (
        "stored precision of the shared bases: 4, 6 or 8 (integer codes + bf16 row scales) or 16"
    ),
    "basis_bits_choices": (
        "precisions each layer's bases are chosen from, by the predicted loss of the layer's "
        "allocation at the first budget (empty: basis_bits)"
    ),
    "budget_counts": "stored (every stored bit) or decode (bits a batch-1 decode step reads per "
    "routed expert weight)",
    "rank": "components kept in the shared bases (None: full rank)",
    "coefficient_mode": "exact (every component at every width) or sampled (faster)",
    "rounding": "gptq (error feedback in component space) or nearest (faster)",
    "allocator": "auto, milp (CVXPY + HiGHS, exact) or greedy (convex hulls, certified gap)",
    "milp_max_units": 'largest allocation "auto" gives the MILP',
    "milp_time_limit": "seconds HiGHS may spend on one allocation",
    "super_experts": 'experts kept at super_expert_bits: indices, {layer: indices} or "auto"',
    "super_expert_bits": "bits of super experts: 8 or 16",
    "super_expert_threshold": '"auto": peak |output| above this × the median expert\'s',
    "dense_dtype": "storage of the non-expert weights: bfloat16, float16 or float32",
    "eval_text": 'evaluation text after quantizing ("": no evaluation)',
    "eval_max_tokens": "evaluate on at most this many tokens (None: the whole text)",
    "eval_batch_size": "evaluation windows per forward pass",
    "seed": "seed of the sampled coefficients",
    "scale_tuning_steps": "Adam steps fitting each expert's scales to its output after rounding "
    "(0: off)",
    "scale_tuning_lr": "learning rate of that fit, on log-scales",
    "scale_tuning_batch": "an expert's training tokens per step of that fit (0: all, every step)",
    "mesh_shape": "devices on the expert axis: () every device, or (n,)",
    "host_memory_gb": "memory the expert chunks are sized by (None: available at the start)",
    "expert_chunk": "experts per device at a time (None: sized by host_memory_gb)",
    "preflight": "check the checkpoint before any work: values (NaN/Inf too), headers or off",
    "distributed.auto": "TPU pod / SLURM / Open MPI: JAX detects coordinator, count and id",
    "distributed.coordinator_address": '"host:port" of process 0 (explicit multi-process)',
    "distributed.num_processes": "processes of the run",
    "distributed.process_id": "this process's index",
    "distributed.initialization_timeout": "seconds to wait for every process to join",
    "distributed.heartbeat_timeout": "seconds of silence after which a peer is declared dead",
    "distributed.barrier_timeout": "seconds a process waits at a barrier for a stuck peer",
}


def config_fields(cfg: ml_collections.ConfigDict, prefix: str = "") -> list[tuple[str, Any]]:
    """Every leaf field of `cfg` as (dotted name, value), in the config's order."""
    out: list[tuple[str, Any]] = []
    for key in cfg.keys():
        value = cfg[key]
        if isinstance(value, ml_collections.ConfigDict):
            out += config_fields(value, f"{prefix}{key}.")
        else:
            out.append((prefix + key, value))
    return out


def config_help(cfg: ml_collections.ConfigDict | None = None) -> str:
    """`--config.field=VALUE  help` for every field of `cfg` (default: `default_config()`), VALUE
    being the field's value there — the default a run with that config file gets."""
    fields = config_fields(default_config() if cfg is None else cfg)
    rows = [
        (f"--config.{name}={_shown(value)}", FIELD_HELP.get(name, "")) for name, value in fields
    ]
    width = 44  # a longer flag (a path) puts its help on the next line
    lines = []
    for flag, text in rows:
        if len(flag) > width:
            lines += [f"  {flag}", f"  {'':{width}}  {text}".rstrip()]
        else:
            lines.append(f"  {flag:{width}}  {text}".rstrip())
    return "\n".join(lines)


def _shown(value: Any) -> str:
    """A value as it is typed on the command line (strings unquoted, the empty one as '')."""
    if isinstance(value, str):
        return value if value else "''"
    return repr(value)


def _is_bits_tuple(v: Any) -> bool:
    return (
        isinstance(v, (tuple, list))
        and len(v) > 0
        and all(int(b) == b and int(b) in VALID_BITS for b in v)
    )


def validate(c: ml_collections.ConfigDict) -> None:
    """Raise ValueError naming the field and the allowed values."""

    def bad(field: str, allowed: str) -> None:
        raise ValueError(f"config.{field}={c[field]!r} is invalid; allowed: {allowed}")

    if not c.model_path:
        bad("model_path", "a Hugging Face or converted checkpoint directory")
    if not c.output_dir:
        bad("output_dir", "a directory path for the quantized checkpoint")
    if c.work_dir and Path(c.work_dir).absolute() in (
        Path(c.output_dir).absolute(),
        *Path(c.output_dir).absolute().parents,
    ):
        bad(
            "work_dir",
            'a directory outside output_dir (it is deleted when the run succeeds), or "" for '
            "OUTPUT_DIR.partial",
        )
    if not c.calib_text:
        bad(
            "calib_text",
            "a text of your model's domain (a .txt or .txt.gz path), or a shipped name "
            "(shakespeare_train, milton)",
        )
    if c.tokenizer and not (Path(c.tokenizer).expanduser() / "tokenizer.json").is_file():
        bad("tokenizer", 'a directory holding a tokenizer.json, or "" for the model\'s own')
    if c.method not in METHODS:
        bad("method", ", ".join(METHODS))
    budgets = c.budget_bits if isinstance(c.budget_bits, (tuple, list)) else (c.budget_bits,)
    if not budgets or any(not isinstance(b, (int, float)) or b <= 0 for b in budgets):
        bad("budget_bits", "positive numbers, e.g. 2.0 or (2.0, 2.5, 3.0)")
    if len({f"{float(b):.2f}" for b in budgets}) < len(
        budgets
    ):  # each budget writes OUTPUT_DIR/bpw_<b:.2f>
        bad(
            "budget_bits",
            "distinct budgets (to 2 decimals: each one writes its own bpw_<budget> directory)",
        )
    if c.budget_scope not in SCOPES:
        bad("budget_scope", ", ".join(SCOPES))
    if c.budget_counts not in ("stored", "decode"):
        bad("budget_counts", "stored, decode")
    if c.allocator not in ALLOCATORS:
        bad("allocator", ", ".join(ALLOCATORS))
    if c.coefficient_mode not in COEFF_MODES:
        bad("coefficient_mode", ", ".join(COEFF_MODES))
    if c.rounding not in ROUNDINGS:
        bad("rounding", ", ".join(ROUNDINGS))
    if c.dense_dtype not in DENSE_DTYPES:
        bad("dense_dtype", ", ".join(DENSE_DTYPES))
    if c.basis not in ("svd", "whitened", "none"):
        bad("basis", "svd, whitened, none")
    if c.loss_weighting not in ("token_sum", "expert_mean"):
        bad("loss_weighting", "token_sum, expert_mean")
    choices = c.basis_bits_choices
    if not isinstance(choices, (tuple, list)) or any(b not in BASIS_BITS for b in choices):
        bad("basis_bits_choices", f"() or a tuple from {BASIS_BITS}")
    if len(set(choices)) != len(choices):
        bad("basis_bits_choices", "distinct precisions")
    if c.basis_bits not in BASIS_BITS:
        bad("basis_bits", ", ".join(str(b) for b in BASIS_BITS[:-1]) + f" or {BASIS_BITS[-1]}")
    if not _is_bits_tuple(c.candidate_bits) or 0 not in c.candidate_bits:
        bad("candidate_bits", f"a tuple from {VALID_BITS} that includes 0")
    if c.super_expert_bits not in (8, 16):
        bad("super_expert_bits", "8 or 16")
    if not (c.super_experts == "auto" or isinstance(c.super_experts, (tuple, list))):
        bad("super_experts", '"auto" or a tuple of expert indices')
    if c.group_size < 1:
        bad("group_size", "a positive integer")
    if c.seq_len < 2:
        bad("seq_len", "an integer >= 2")
    if c.num_calib_tokens < c.seq_len:
        bad("num_calib_tokens", f">= seq_len ({c.seq_len})")
    if not 0 <= c.expert_mass_floor:
        bad("expert_mass_floor", "a number >= 0 (fraction of the mean expert mass)")
    if c.rank is not None and c.rank < 1:
        bad("rank", "None (full) or a positive integer")
    if not (isinstance(c.scale_tuning_steps, int) and c.scale_tuning_steps >= 0):
        bad("scale_tuning_steps", "an integer >= 0 (0: no tuning)")
    if c.scale_tuning_steps and c.rounding != "gptq":
        bad(
            "scale_tuning_steps",
            "0 with rounding='nearest' (the fit runs on the calibration inputs the error feedback "
            "keeps; set --config.scale_tuning_steps=0 or --config.rounding=gptq)",
        )
    if not c.scale_tuning_lr > 0:
        bad("scale_tuning_lr", "a positive number")
    if not (isinstance(c.scale_tuning_batch, int) and c.scale_tuning_batch >= 0):
        bad("scale_tuning_batch", "an integer >= 0 (0: every training token each step)")
    ms = c.mesh_shape
    if not (
        ms in ((), None)
        or (isinstance(ms, int) and not isinstance(ms, bool) and ms > 0)
        or (isinstance(ms, (tuple, list)) and len(ms) == 1 and isinstance(ms[0], int) and ms[0] > 0)
    ):
        bad("mesh_shape", "() for every device, or (n,) with n > 0 devices on the expert axis")
    if c.host_memory_gb is not None and not c.host_memory_gb > 0:
        bad(
            "host_memory_gb", "None (the memory available at the start) or a positive number of GiB"
        )
    if c.expert_chunk is not None and c.expert_chunk < 1:
        bad("expert_chunk", "None (sized by host_memory_gb) or a positive number of experts")
    if c.preflight not in PREFLIGHTS:
        bad("preflight", ", ".join(PREFLIGHTS))
    _validate_distributed(c.distributed)
    if c.method != "bitsmoe" and (c.distributed.auto or c.distributed.num_processes > 1):
        bad("method", "bitsmoe for a multi-process run (the baselines run in one process)")


def _validate_distributed(d: ml_collections.ConfigDict) -> None:
    def bad(field: str, allowed: str) -> None:
        raise ValueError(f"config.distributed.{field}={d[field]!r} is invalid; allowed: {allowed}")

    if not isinstance(d.num_processes, int) or d.num_processes < 1:
        bad("num_processes", "an integer >= 1")
    if not isinstance(d.process_id, int) or not 0 <= d.process_id < d.num_processes:
        bad("process_id", f"an integer in [0, num_processes={d.num_processes})")
    if d.num_processes > 1 and not d.auto and ":" not in d.coordinator_address:
        bad(
            "coordinator_address",
            '"host:port" of process 0 (or distributed.auto=True on a TPU pod)',
        )
    for f in ("initialization_timeout", "heartbeat_timeout", "barrier_timeout"):
        if not d[f] > 0:
            bad(f, "a positive number of seconds")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """One quantization run, validated: where from and to, which method at which budgets, the
    calibration and evaluation texts, the process layout, and the method's parameters (`params`).

    Field names and values are those of `default_config()` (their help is there); the method's own
    fields live in `params`. Make one with `run_config(config_dict)`, or with
    `RunConfig.create(model_path=..., output_dir=..., **fields)` from Python.
    """

    model_path: str
    output_dir: str
    overwrite: bool
    resume: bool
    work_dir: str
    method: str
    budget_bits: tuple[float, ...]
    budget_scope: str
    calib_text: str
    tokenizer: str
    num_calib_tokens: int
    seq_len: int
    sequential: bool
    dense_dtype: str
    eval_text: str
    eval_max_tokens: int | None
    eval_batch_size: int
    mesh_shape: Any
    host_memory_gb: float | None
    expert_chunk: int | None
    preflight: str
    distributed: DistributedConfig
    params: MethodConfig

    @classmethod
    def create(cls, **fields: Any) -> RunConfig:
        """`default_config()` with `fields` set (``"distributed.x"`` for the nested ones),
        validated."""
        return run_config(with_fields(default_config(), fields))

    def replace(self, **fields: Any) -> RunConfig:
        """A copy with `fields` changed (method fields by their flat names), validated again."""
        return run_config(with_fields(self.to_config_dict(), fields))

    def to_dict(self) -> dict[str, Any]:
        """The flat dict the ConfigDict form gives (`ConfigDict.to_dict()`: keys sorted, method
        fields at the top level): what the quantized checkpoint records and the fingerprint
        hashes."""
        flat = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name not in ("distributed", "params")
        }
        flat.update({k: getattr(self.params, k) for k in METHOD_FIELDS})
        flat["distributed"] = dict(sorted(dataclasses.asdict(self.distributed).items()))
        return dict(sorted(flat.items()))

    def to_config_dict(self) -> ml_collections.ConfigDict:
        flat = self.to_dict()
        nested = {f"distributed.{k}": v for k, v in flat.pop("distributed").items()}
        return with_fields(default_config(), {**flat, **nested})


def field_node(cfg: ml_collections.ConfigDict, key: str) -> tuple[ml_collections.ConfigDict, str]:
    """The ConfigDict holding dotted field `key` and the field's last name; unknown fields are
    errors."""
    *path, name = key.split(".")
    node = cfg
    for i, part in enumerate(path):
        if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
            raise ValueError(
                f"unknown config field {'.'.join(path[: i + 1])!r}; known fields: "
                f"{', '.join(sorted(node.keys()))}"
            )
        node = node[part]
    if name not in node:
        where = "" if not path else f" of config.{'.'.join(path)}"
        raise ValueError(
            f"unknown config field {key!r}; known fields{where}: {', '.join(sorted(node.keys()))}"
        )
    return node, name


def with_fields(
    c: ml_collections.ConfigDict, fields: Mapping[str, Any]
) -> ml_collections.ConfigDict:
    """Set ``fields`` on `c` (dotted names for nested fields) and return it; an unknown field is an
    error that lists the known ones (`field_node`)."""
    for key, value in fields.items():
        node, name = field_node(c, key)
        node[name] = tuple(value) if isinstance(value, list) else value
    return c


def run_config(c: ml_collections.ConfigDict) -> RunConfig:
    """Validate `c` (see `validate`) and turn it into a `RunConfig`."""
    validate(c)
    d = c.to_dict()
    params = MethodConfig(**{k: d[k] for k in METHOD_FIELDS})
    run_fields = [
        f.name for f in dataclasses.fields(RunConfig) if f.name not in ("distributed", "params")
    ]
    return RunConfig(
        **{k: d[k] for k in run_fields},
        distributed=DistributedConfig(**d["distributed"]),
        params=params,
    )
