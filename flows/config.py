"""The job model: one validated config for every stage of a mapping job.

A job file is YAML; :func:`load_job` validates it and raises :class:`JobConfigError`
whose message names the file and the offending field (``corpus.seq_len``), so a typo
fails before any model is loaded or any data is written.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from functools import partial
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ops.configs import ARCHITECTURES, SAEConfig, SNMFConfig, SteeringSearch
from ops.corpus import MIN_TOKENS
from ops.errors import NeuronmapError

DEFAULT_JOB = Path(__file__).with_name("default_job.yaml")


class JobConfigError(NeuronmapError):
    """A job file or job option is invalid."""


class _Strict(BaseModel):
    """Unknown keys are errors: a misspelled option must not be silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class CorpusConfig(_Strict):
    source: str | list[str] = Field(
        "bundled",
        description="'bundled' (wiki en/es/fr + Shakespeare), a .txt/.jsonl/.parquet file or "
        "directory, a list of those, or 'hf:NAME[:split]' for a local Hugging Face dataset.",
    )
    subsets: list[str] | None = Field(
        None, description="For the bundled corpus: which sub-corpora (default all)."
    )
    seq_len: int = Field(128, ge=2, le=65536, description="Tokens per sequence, BOS included.")
    max_tokens: int | None = Field(
        200_000, ge=1, description="Stop tokenizing once this many valid tokens are kept."
    )
    shard_sequences: int = Field(
        64,
        ge=1,
        description="Sequences per shard: the unit of work, resume and Zarr chunking of the corpus.",
    )
    prepend_bos: bool = Field(True, description="Start every sequence with the tokenizer's BOS.")
    exclude_bos: bool = Field(
        True, description="Leave BOS positions out of statistics and examples (attention sinks)."
    )
    text_field: str = Field("text", description="Text column/field of jsonl and parquet inputs.")
    source_field: str = Field("source", description="Sub-corpus label column/field, optional.")
    seed: int = Field(0, description="Seed of the document order of the bundled corpus.")

    @model_validator(mode="after")
    def _room_after_bos(self) -> CorpusConfig:
        # tokenize_documents keeps a sequence only with >= MIN_TOKENS real tokens: a seq_len
        # without room for them after BOS would tokenize the whole corpus, then keep nothing
        if self.prepend_bos and self.seq_len < MIN_TOKENS + 1:
            raise ValueError(
                f"seq_len {self.seq_len} leaves no room: with prepend_bos one position is BOS "
                f"and a sequence needs {MIN_TOKENS} real tokens, so seq_len must be >= "
                f"{MIN_TOKENS + 1} (or set prepend_bos: false)"
            )
        return self


class ModelConfig(_Strict):
    name: str = Field(description="Name of the model inside the atlas (models/<name>/...).")
    source: str = Field(
        description="'smollm2' (bundled SmolLM2-135M-Instruct), a local directory or a hub id."
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="Compute dtype; auto = bfloat16 on a GPU with it (else float16), "
        "bfloat16 on a CPU with native bf16 (AVX-512 BF16/AMX), float32 on other CPUs "
        "(emulated bf16 is ~4x slower). The atlas records the dtype used and why "
        "(model attrs compute_dtype).",
    )

    @field_validator("name")
    @classmethod
    def _name_is_a_path_segment(cls, v: str) -> str:
        return valid_model_name(v)


def valid_model_name(v: str) -> str:
    """``v`` when it can name a model in an atlas, else ``ValueError`` (also for the model
    arguments of the query commands: ``..`` must not reach the store as a path)."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\-]*", v) or "--" in v:
        raise ValueError(
            f"model name {v!r} must be letters, digits, '_', '.', '-' (no '--'): "
            "it becomes a Zarr group name"
        )
    return v


class TaxonomyConfig(_Strict):
    """What the record pass counts per neuron for the taxonomy (``ops.taxonomy``), and when
    a score makes a label. A neuron "fires" on a token when its activation is above its
    threshold: ``threshold`` for every neuron, or its own ``quantile`` of activations."""

    threshold: float | None = Field(
        None, description="Fires when the activation is above this. Default (with no "
        "quantile): 0 for ReLU models, the 0.99 quantile for GELU/SwiGLU ones, whose "
        "activations are rarely exactly 0.",
    )  # fmt: skip
    quantile: float | None = Field(
        None, gt=0, lt=1, description="Per-neuron threshold: this quantile of the neuron's "
        "activations over the first `probe_tokens` recorded tokens of the corpus (shard 0 "
        "on), so 1 and 2 workers agree.",
    )  # fmt: skip
    probe_tokens: int = Field(
        4096, ge=16, description="Tokens the quantile thresholds are estimated from."
    )
    buckets: int = Field(8, ge=1, le=256, description="Position buckets per sequence.")
    sketch: int = Field(
        32, ge=1, le=1024, description="Trigger tokens (and bigrams) kept per neuron: counts "
        "are exact while a neuron fires on at most this many distinct ones.",
    )  # fmt: skip
    min_fires: int = Field(20, ge=1, description="Fewer fires: no label but dead.")
    token: float = Field(0.5, ge=0, le=1, description="Top-1 token share of a token detector.")
    ngram: float = Field(
        0.5, ge=0, le=1, description="Top-1 bigram share of an n-gram detector (and above its "
        "token share).",
    )  # fmt: skip
    positional: float = Field(
        0.3, ge=0, le=1, description="Mutual information of position bucket and firing over "
        "the entropy of firing.",
    )  # fmt: skip
    source: float = Field(
        0.5, ge=0, le=1, description="Source selectivity: 1 - entropy of per-source firing "
        "rates / log(sources).",
    )  # fmt: skip

    @model_validator(mode="after")
    def _one_rule(self) -> TaxonomyConfig:
        if self.threshold is not None and self.quantile is not None:
            raise ValueError("give threshold or quantile, not both")
        return self


class RecordConfig(_Strict):
    topk: int = Field(32, ge=1, le=4096, description="Max-activating examples kept per neuron.")
    hist_bins: int = Field(
        256, ge=4, le=4096, description="Histogram bins, symmetric log-spaced around 0."
    )
    hist_min: float = Field(1e-3, gt=0, description="Smallest |activation| with its own bin.")
    hist_max: float = Field(1e4, gt=0, description="Largest bin edge; beyond it values clamp.")
    batch_size: int = Field(8, ge=1, description="Sequences per forward pass.")
    sample_tokens: int = Field(
        0, ge=0, description="Raw activations kept per layer (stratified uniform over shards)."
    )
    sample_layers: Literal["all"] | list[int] = Field(
        "all", description="Layers whose activation sample is stored."
    )
    dead_frequency: float = Field(
        1e-6, ge=0, description="A neuron is dead when its activation frequency (> 0) is below."
    )
    massive_threshold: float = Field(
        100.0, gt=0, description="A neuron is massive when max |activation| reaches this."
    )
    seed: int = Field(0, description="Seed of the activation sample.")
    properties: bool = Field(
        True, description="Also store weight-derived neuron properties (norms, vocab composition)."
    )
    top_tokens: int = Field(
        10, ge=1, le=100, description="Promoted/suppressed tokens kept per neuron."
    )
    taxonomy: TaxonomyConfig | None = Field(
        default_factory=TaxonomyConfig,
        description="Counters for the neuron taxonomy (dead, token, n-gram, positional, "
        "source-selective); null turns them off.",
    )  # fmt: skip

    @model_validator(mode="after")
    def _hist_range(self) -> RecordConfig:
        if self.hist_bins % 2:
            raise ValueError("hist_bins must be even (bins are symmetric around 0)")
        if self.hist_max <= self.hist_min:
            raise ValueError("hist_max must be larger than hist_min")
        return self


class ResourcesConfig(_Strict):
    backend: Literal["ray", "local"] = Field(
        "ray",
        description="Where the job's workers run: 'ray' (actors on a local Ray instance or "
        "the cluster at ray_address) or 'local' (this process, no Ray: one worker, the same "
        "numbers bit for bit; for small jobs, debugging and tests).",
    )
    workers: int = Field(2, ge=1, description="Ray model-worker actors (one GPU each if any); "
                         "they live for the whole job and keep the models they load.")  # fmt: skip
    plugins: list[str] = Field(
        default_factory=list,
        description="Modules imported by the driver and by every worker before any model "
        "loads (e.g. one that calls ops.models.register_arch for a new family).",
    )
    gpus: Literal["auto"] | bool = Field(
        "auto", description="Put workers on GPUs: auto = when Ray sees GPUs."
    )
    inflight_per_worker: int = Field(2, ge=1, description="Shards queued per worker at once.")
    ray_address: str | None = Field(
        None, description="Ray cluster address; None = $RAY_ADDRESS or an in-process cluster."
    )
    max_restarts: int = Field(2, ge=0, description="Ray restarts of a crashed worker actor.")
    scale_down: bool = Field(
        False, description="When the cluster cannot place `workers` actors: run with as many "
        "as fit (with a warning) instead of failing before any work is queued.",
    )  # fmt: skip


class SeedsConfig(_Strict):
    """A family of small GPT-2-style models trained from different init seeds (same data order)."""

    name: str = Field("seeds", description="Family name; its models are <name>-s<i> in the atlas.")
    count: int = Field(3, ge=2, le=64, description="Number of seeds (models) in the family.")
    layers: int = Field(2, ge=1, le=48, description="Transformer blocks per model.")
    d_model: int = Field(128, ge=8, description="Residual width.")
    d_mlp: int = Field(512, ge=8, description="MLP neurons per layer.")
    n_heads: int = Field(4, ge=1, description="Attention heads.")
    vocab_size: int = Field(
        1024,
        ge=300,
        le=65536,
        description="BPE vocabulary trained for the family (512-4096 is cheap).",
    )
    seq_len: int = Field(128, ge=8, description="Training context length.")
    train_tokens: int = Field(
        2_000_000, ge=1000, description="Training tokens per seed (~2M before universality shows)."
    )
    batch_size: int = Field(16, ge=1, description="Sequences per optimizer step.")
    lr: float = Field(3e-3, gt=0, description="Peak AdamW learning rate (cosine decay, warmup).")
    base_seed: int = Field(0, description="Seed i is initialised with base_seed + i.")
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto",
        description="Autocast dtype for training; auto = bfloat16 on a GPU (tensor "
        "cores) and on a CPU with native bf16, float32 on other CPUs (emulated bf16 trains "
        "~2.4x slower there). Weights and optimiser state stay float32; the train log records "
        "the dtype used.",
    )


class UniversalityConfig(_Strict):
    """Cross-model neuron correlations (the "universal neurons" analysis)."""

    family: str | None = Field(None, description="Compare the models of this trained family.")
    models: list[str] | None = Field(None, description="Or: names of job models to compare.")
    threshold: float = Field(0.5, description="universal = excess correlation above this.")
    baseline: Literal["rotation"] = Field(
        "rotation", description="Baseline: random orthogonal rotation of the other model's neurons."
    )
    keep_full: bool = Field(False, description="Store the full correlation matrices too "
                            "(compared layers, chunked per layer pair; 4 bytes per neuron pair "
                            "in float32, 2 in float16).")  # fmt: skip
    full_dtype: Literal["float32", "float16"] = Field(
        "float32", description="dtype of the stored full r matrices (keep_full)."
    )
    seed: int = Field(0, description="Seed of the random rotations.")
    memory_gb: float | None = Field(
        None, gt=0, description="Co-moment state one worker may hold, GiB. The plan cuts model "
        "pairs into tiles of whole layers that fit it. Default: on GPUs 80 GiB (an 80 GB "
        "H100 minus headroom: raise it on an H200); on CPUs half this machine's memory shared "
        "by the workers."
    )  # fmt: skip
    matmul_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Inputs of the co-moment GEMMs (always accumulated in float32, "
        "folded into float64). auto: bfloat16 on CUDA (tensor cores; r within 1e-3), float32 "
        "on CPU. Reduced precision is CUDA only."
    )  # fmt: skip
    flush_tokens: int = Field(
        65536, ge=1, description="On CUDA, tokens summed in the float32 buffer before it is "
        "folded into the float64 state (bounds float32 error; each fold reads the whole state)."
    )  # fmt: skip
    checkpoint_shards: int | None = Field(
        None, ge=1, description="Checkpoint a worker's co-moment state every this many shards "
        "(besides checkpoint_minutes); a killed run resumes from the last checkpoint."
    )  # fmt: skip
    checkpoint_minutes: float | None = Field(
        30.0, gt=0, description="Checkpoint a worker's state at least this often (a checkpoint "
        "is as large as the state: the plan prints it). null: only checkpoint_shards."
    )  # fmt: skip

    @model_validator(mode="after")
    def _one_selector(self) -> UniversalityConfig:
        if (self.family is None) == (self.models is None):
            raise ValueError("give exactly one of 'family' or 'models'")
        if self.models is not None and len(self.models) < 2:
            raise ValueError("'models' needs at least two model names")
        return self


def _ops_default(cls: type, name: str) -> Any:
    """The default of an ``ops`` config field: every knob has its default in one place."""
    return next(f.default for f in dataclasses.fields(cls) if f.name == name)


_SAE = partial(_ops_default, SAEConfig)
_SNMF = partial(_ops_default, SNMFConfig)
_steer_default = partial(_ops_default, SteeringSearch)


class SAERunConfig(_Strict):
    """One sparse autoencoder over a layer's MLP activations (``ops.sae.SAEConfig`` knobs)."""

    name: str = Field("topk", description="Run name: models/<m>/layers/<L>/sae/<name>.")
    arch: str = Field(
        _SAE("arch"), description="Architecture, a key of the ops.sae registry "
        "(topk, batchtopk, relu, jumprelu)."
    )  # fmt: skip
    expansion: int = Field(8, ge=1, description="n_latents = expansion * d_mlp.")
    k: int = Field(_SAE("k"), ge=1, description="Active latents per token (topk/batchtopk).")
    l1_coef: float = Field(_SAE("l1_coef"), ge=0, description="L1 coefficient (relu).")
    jumprelu_threshold_init: float = Field(
        _SAE("jumprelu_threshold_init"), gt=0, description="jumprelu: initial threshold."
    )
    jumprelu_bandwidth: float = Field(
        _SAE("jumprelu_bandwidth"),
        gt=0,
        description="jumprelu: width of the threshold's pseudo-gradient kernel.",
    )
    jumprelu_l0_coef: float = Field(
        _SAE("jumprelu_l0_coef"), ge=0, description="jumprelu: weight of the L0 penalty."
    )
    auxk: int = Field(
        _SAE("auxk"), ge=0, description="topk/batchtopk: dead latents AuxK uses per token."
    )
    auxk_coef: float = Field(_SAE("auxk_coef"), ge=0, description="AuxK loss weight; 0 = off.")
    b_dec_init: Literal["geometric_median", "mean", "zeros"] = Field(
        _SAE("b_dec_init"), description="Decoder bias init from the first batch."
    )
    normalize_input: bool = Field(
        _SAE("normalize_input"), description="Scale inputs to unit mean squared norm."
    )
    lr: float = Field(_SAE("lr"), gt=0, description="Adam learning rate.")
    batch_size: int = Field(_SAE("batch_size"), ge=1, description="Tokens per step.")
    epochs: float = Field(4.0, gt=0, description="Passes over the training tokens.")
    seed: int = Field(_SAE("seed"), description="Init and shuffling seed.")
    source: Literal["sample", "stream"] = Field(
        "sample",
        description="Training tokens: the stored activation sample, or 'stream': every corpus "
        "token, recorded live by the Ray workers in shard order (no activation dump; the "
        "first epoch shares the record stage's forward when the job records this model from "
        "scratch). Metrics and feature stats use the sample either way.",
    )
    buffer_tokens: int = Field(
        65536, ge=2, description="Shuffle buffer of a streamed run (>= 2 * batch_size)."
    )

    _RUN_ONLY: ClassVar[set[str]] = {"name", "expansion", "epochs", "source", "buffer_tokens"}

    @field_validator("arch")
    @classmethod
    def _registered(cls, v: str) -> str:
        if v not in ARCHITECTURES:
            raise ValueError(f"unknown SAE architecture {v!r}; registered: {sorted(ARCHITECTURES)}")
        return v

    @model_validator(mode="after")
    def _buffer_fits(self) -> SAERunConfig:
        if self.source == "stream" and self.buffer_tokens < 2 * self.batch_size:
            raise ValueError(f"buffer_tokens ({self.buffer_tokens}) must be >= 2 * batch_size")
        return self

    def sae_config(self, d_in: int, dead_after_tokens: int) -> SAEConfig:
        """The ``ops`` config of this run for a layer of width ``d_in``."""
        knobs = self.model_dump(exclude=self._RUN_ONLY)
        try:
            return SAEConfig(d_in=d_in, n_latents=self.expansion * d_in,
                             dead_after_tokens=dead_after_tokens, **knobs)  # fmt: skip
        except ValueError as e:
            raise JobConfigError(f"SAE run {self.name!r}: {e}") from None


class SNMFRunConfig(_Strict):
    """One semi-nonnegative matrix factorisation of a layer's MLP activations."""

    name: str = Field("snmf", description="Run name: models/<m>/layers/<L>/snmf/<name>.")
    k: int = Field(64, ge=1, description="Number of features.")
    keep_fraction: float = Field(
        _SNMF("keep_fraction"), gt=0, le=1, description="Neurons kept per feature (top |z|)."
    )
    iters: int = Field(_SNMF("iters"), ge=1, description="Maximum alternating iterations.")
    patience: int = Field(
        _SNMF("patience"), ge=1, description="Stop after this many iterations without progress."
    )
    tol: float = Field(
        _SNMF("tol"), ge=0, description="Relative loss drop that counts as progress."
    )
    init: Literal["random", "svd", "kmeans"] = Field(
        _SNMF("init"), description="Initialisation of Z."
    )
    seed: int = Field(_SNMF("seed"), description="Initialisation seed.")

    def snmf_config(self) -> SNMFConfig:
        """The ``ops`` config of this run."""
        return SNMFConfig(**self.model_dump(exclude={"name"}))


class SteeringConfig(_Strict):
    """Causal check: steer along feature directions, each at the same next-token KL."""

    target_kl: float = Field(
        _steer_default("target_kl"), gt=0,
        description="Mean next-token KL(clean || steered) alpha is searched for (nats).",
    )  # fmt: skip
    tolerance: float = Field(_steer_default("tolerance"), gt=0, lt=1,
                             description="Accepted |KL - target| / target.")  # fmt: skip
    features: int = Field(
        2, ge=0, description="Features evaluated per run: those with the largest mean activation."
    )
    contrast: list[str] | None = Field(
        None, min_length=2, max_length=2,
        description="Difference-in-means baseline [A, B]: mean activation on corpus source A "
        "minus source B (e.g. [wiki-fr, wiki-en]); null to skip.",
    )  # fmt: skip
    sequences: int = Field(8, ge=1, description="Evaluation sequences, spread over the corpus.")
    max_evals: int = Field(_steer_default("max_evals"), ge=2,
                           description="Forward passes allowed per search.")  # fmt: skip
    top_tokens: int = Field(_steer_default("top"), ge=1,
                            description="Promoted and suppressed tokens reported.")  # fmt: skip


class DictionariesConfig(_Strict):
    """Feature dictionaries learned from the stored activation sample of one model layer."""

    model: str = Field(description="Job model whose activations are factorised.")
    layer: int = Field(ge=0, description="Layer (must be in record.sample_layers).")
    sae: list[SAERunConfig] = Field(default_factory=list, description="SAE runs.")
    snmf: list[SNMFRunConfig] = Field(default_factory=list, description="SNMF runs.")
    ce_batches: int = Field(4, ge=1, description="Batches used to measure CE loss recovered.")
    feature_stats: Literal["corpus", "sample"] = Field(
        "corpus",
        description="Where feature statistics and top examples come from: every corpus token, "
        "like neurons (one more pass of the model up to the layer; SNMF coefficients of unseen "
        "tokens by nonnegative least squares under the fitted Z), or the stored sample.",
    )
    steering: SteeringConfig | None = Field(
        None, description="Steering evaluation of features and a difference-in-means baseline."
    )


class JobConfig(_Strict):
    atlas: str = Field("./atlas.zarr", min_length=1, description="Atlas directory (Zarr v3).")
    corpus: CorpusConfig = Field(default_factory=CorpusConfig)
    models: list[ModelConfig] = Field(min_length=1, description="Models to map.")
    layers: Literal["all"] | list[int] = Field("all", description="Layers to record.")
    record: RecordConfig = Field(default_factory=RecordConfig)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    seeds: SeedsConfig | None = Field(
        None, description="Train a seed family on the job's corpus and map it too."
    )
    universality: UniversalityConfig | None = Field(
        None, description="Cross-model correlations (default with seeds: over the family)."
    )
    dictionaries: DictionariesConfig | None = Field(
        None, description="SAE and SNMF dictionaries over one layer's activation sample."
    )

    @model_validator(mode="after")
    def _dictionary_target(self) -> JobConfig:
        d = self.dictionaries
        if d is None:
            return self
        names = [m.name for m in self.models]
        if d.model not in names:
            raise ValueError(f"dictionaries.model {d.model!r} is not a job model {names}")
        sl = self.record.sample_layers
        if self.record.sample_tokens == 0 or (sl != "all" and d.layer not in sl):
            raise ValueError(
                f"dictionaries.layer {d.layer} needs an activation sample: set "
                "record.sample_tokens > 0 and include the layer in record.sample_layers"
            )
        return self

    @model_validator(mode="after")
    def _universality_targets(self) -> JobConfig:
        u = self.universality
        if u is None:
            return self
        if u.family is not None and (self.seeds is None or self.seeds.name != u.family):
            raise ValueError(
                f"universality.family {u.family!r} needs a 'seeds' section with that name"
            )
        if u.models is not None:
            names = {m.name for m in self.models}
            unknown = [m for m in u.models if m not in names]
            if unknown:
                raise ValueError(
                    f"universality.models {unknown} are not job models {sorted(names)}"
                )
        return self

    @field_validator("models")
    @classmethod
    def _unique_names(cls, v: list[ModelConfig]) -> list[ModelConfig]:
        names = [m.name for m in v]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"model names must be unique; repeated: {dup}")
        return v

    @field_validator("layers", mode="after")
    @classmethod
    def _layers_non_negative(cls, v: Any) -> Any:
        if isinstance(v, list):
            if not v:
                raise ValueError("layers must be 'all' or a non-empty list")
            if any(i < 0 for i in v):
                raise ValueError("layer indices must be >= 0")
            return sorted(set(v))
        return v

    def fingerprint(self, *parts: str) -> str:
        """Content key of what determines the recorded numbers (not where they go or who runs)."""
        payload = self.model_dump(mode="json", exclude={"atlas": True, "resources": True})
        blob = json.dumps([payload, *parts], sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def format_error(err: ValidationError, origin: str) -> str:
    lines = [f"invalid {origin}:"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        lines.append(f"  field '{loc}': {e['msg']}")
    return "\n".join(lines)


def parse_job(data: Any, origin: str = "<dict>") -> JobConfig:
    """Validate an already-parsed job mapping."""
    if not isinstance(data, dict):
        raise JobConfigError(f"invalid job {origin}: expected a mapping at the top level")
    try:
        return JobConfig.model_validate(data)
    except ValidationError as e:
        raise JobConfigError(format_error(e, f"job {origin}")) from None


def load_job(path: str | Path | None = None, **overrides: Any) -> JobConfig:
    """Load a YAML job file (None = the bundled default job) and apply top-level overrides."""
    p = Path(path) if path is not None else DEFAULT_JOB
    if not p.is_file():
        raise JobConfigError(f"job file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise JobConfigError(f"job file {p} is not UTF-8 text (a YAML job file)") from None
    except OSError as e:
        raise JobConfigError(f"cannot read job file {p}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise JobConfigError(f"job file {p} is not valid YAML: {e}") from None
    if isinstance(data, dict):
        data.update({k: v for k, v in overrides.items() if v is not None})
    return parse_job(data, origin=f"file {p}")


def with_options(job: JobConfig, origin: str, **sections: dict[str, Any]) -> JobConfig:
    """``job`` with ``sections`` merged in (``resources={"workers": 4}``) and validated like
    a job file, so a command-line option gets the same checks and an error naming its field
    (``model_copy`` would take ``--workers -1`` unchecked)."""
    data = job.model_dump(exclude_unset=True)
    for key, values in sections.items():
        data[key] = {**data.get(key, {}), **values}
    return parse_job(data, origin=origin)
