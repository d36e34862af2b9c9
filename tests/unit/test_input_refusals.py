"""`rift rollout`, `rift eval` and `rift train` refuse a bad model folder or a length that does not
fit the model, in one line, before any engine or model is built, and leave existing output alone.

The cases are the mistakes a new user makes first: a mistyped `--model` path (huggingface_hub
would read it as a hub repo id and print 70 lines), a folder without a tokenizer (transformers
then blames sentencepiece, which is installed), an HF folder with `.bin` weights only, the default
`--max-tokens 512` on a model with 512 positions, one prompt longer than the context, and a 10 MB
prompt line (refused from its length in characters, before it is tokenized). Every check is run
through the real CLI in a subprocess (tests/cli_refusals.py states what a refusal promises).
The model is the shared tiny Llama of tests/rollout_fixtures.py (512 positions, a sentencepiece
tokenizer of 300 pieces, digits split: "1 " is at least one token).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.cli_refusals import assert_refused, run_rift
from tests.rollout_fixtures import MAX_POSITIONS, arithmetic_prompts, shared_tiny_model, write_jsonl

COMMANDS = ("rollout", "eval")
LONG_PROMPT = "What is " + "1 " * MAX_POSITIONS + "?"  # > MAX_POSITIONS tokens: digits and spaces split


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> dict[str, Path]:
    return shared_tiny_model(tmp_path_factory)


@pytest.fixture()
def prompts(tmp_path) -> Path:
    return write_jsonl(tmp_path / "prompts.jsonl", arithmetic_prompts(3))


def _existing_output(command: str, tmp_path: Path) -> tuple[list[str], Path]:
    """`--out` pointing at earlier output (with --overwrite for rollout): a refusal must keep it."""
    if command == "rollout":
        out = tmp_path / "buffer"
        out.mkdir()
        (out / "keep.txt").write_text("earlier buffer\n")
        return ["--out", str(out), "--overwrite"], out / "keep.txt"
    out = tmp_path / "eval.json"
    out.write_text('{"earlier": true}\n')
    return ["--out", str(out)], out


def _run(command: str, model_dir: Path, prompts: Path, tmp_path: Path, *extra: str, fresh: bool = False):
    out_args, kept = _existing_output(command, tmp_path)
    before = kept.read_text()
    result = run_rift(command, "--model", str(model_dir), "--prompts", str(prompts), *out_args, *extra, fresh=fresh)
    assert kept.read_text() == before, "a refused run changed the existing output"
    return result


def _copy_model(model: dict[str, Path], tmp_path: Path) -> Path:
    return Path(shutil.copytree(model["hf"], tmp_path / "model"))


# ------------------------------------------------------------------- the model folder


@pytest.mark.parametrize("command", COMMANDS)
def test_a_mistyped_model_path_is_one_line_naming_the_flag(model, prompts, tmp_path, command):
    typo = model["hf"].parent / "hff"
    # a real interpreter: nothing printed while importing either (the other cases run in forks)
    result = _run(command, typo, prompts, tmp_path, "--max-tokens", "8", fresh=True)
    line = assert_refused(result, command, "--model", str(typo), "does not exist")
    assert "huggingface" not in line.lower() and "repo" not in line.lower(), line


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("removed", [("tokenizer.model",), ("tokenizer.model", "tokenizer_config.json")],
                         ids=["config-names-a-missing-file", "no-tokenizer-files"])
def test_a_folder_without_a_tokenizer_is_one_line_naming_it(model, prompts, tmp_path, command, removed):
    folder = _copy_model(model, tmp_path)
    for name in removed:
        (folder / name).unlink()
    result = _run(command, folder, prompts, tmp_path, "--max-tokens", "8")
    line = assert_refused(result, command, "--model", str(folder), "tokenizer")
    assert "installed" not in line, line  # transformers' own error blamed sentencepiece (installed)


# ------------------------------------------------------------------- lengths


@pytest.mark.parametrize("command", COMMANDS)
def test_the_default_max_tokens_longer_than_the_context_names_the_flag(model, prompts, tmp_path, command):
    """512 response tokens + any prompt > 512 positions: vLLM's own error names neither the flag
    nor the limit's source, and recommends VLLM_ALLOW_LONG_MAX_MODEL_LEN."""
    result = _run(command, model["hf"], prompts, tmp_path)
    line = assert_refused(result, command, "--max-tokens 512", "max_position_embeddings", str(MAX_POSITIONS))
    assert "VLLM_ALLOW_LONG_MAX_MODEL_LEN" not in result.stderr, line


@pytest.mark.parametrize("command", COMMANDS)
def test_a_prompt_longer_than_the_context_names_its_file_line_and_the_flag(model, tmp_path, command):
    records = arithmetic_prompts(2)
    path = tmp_path / "prompts.jsonl"
    # line 1 fits, line 2 is blank (the line number is the file's, not the record's), line 3 does not
    path.write_text(json.dumps(records[0]) + "\n\n" + json.dumps({"prompt": LONG_PROMPT, "answer": "1"}) + "\n")
    result = _run(command, model["hf"], path, tmp_path, "--max-tokens", "8")
    assert_refused(result, command, f"{path}:3", "--max-tokens", "tokens", str(MAX_POSITIONS))


def test_a_huge_prompt_line_is_refused_from_its_length_before_tokenizing(model, tmp_path):
    """10 MB in one prompt: tokenizing it took 23 s and 2.5 GB before vLLM refused it. The
    character bound refuses it first: the message counts characters, not tokens."""
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps(arithmetic_prompts(1)[0]) + "\n"
                    + json.dumps({"prompt": "7" * 10_000_000, "answer": "7"}) + "\n")
    result = _run("rollout", model["hf"], path, tmp_path, "--max-tokens", "8")
    assert_refused(result, "rollout", f"{path}:2", "10000000 characters", "--max-tokens")


def test_a_max_model_len_above_the_models_positions_names_the_flag(model, prompts, tmp_path):
    result = _run("rollout", model["hf"], prompts, tmp_path, "--max-tokens", "8", "--max-model-len", "1024")
    assert_refused(result, "rollout", "--max-model-len 1024", "max_position_embeddings", str(MAX_POSITIONS))
    assert "VLLM_ALLOW_LONG_MAX_MODEL_LEN" not in result.stderr


# ------------------------------------------------------------------- rift train


def _train(model_dir: Path, prompts: Path, tmp_path: Path, *overrides: str, fresh: bool = False, **env: str):
    run_dir = tmp_path / "run"
    result = run_rift(
        "train", f"model.hf_dir={model_dir}", f"data.prompts={prompts}", "data.prompts_per_step=4", "rollout.k=2",
        "rollout.max_tokens=8", "training.steps=1", "training.global_batch_size=8", "training.micro_batch_size=4",
        "algorithm.reward_workers=1", f"logging.dir={run_dir}", "logging.tensorboard=false", *overrides,
        timeout=240, fresh=fresh, **env,
    )
    assert not run_dir.exists(), f"a refused run wrote {sorted(p.name for p in run_dir.iterdir())}"
    return result


@pytest.mark.parametrize("weights", [None, "pytorch_model.bin"], ids=["no-weights", "bin-only"])
def test_train_refuses_an_hf_folder_without_safetensors(model, prompts, tmp_path, weights):
    folder = _copy_model(model, tmp_path)
    (folder / "model.safetensors").unlink()
    if weights:
        (folder / weights).write_bytes(b"not loaded: only its name matters")
    result = _train(folder, prompts, tmp_path)
    assert_refused(result, "train", "model.hf_dir", str(folder), "no *.safetensors")


def test_train_refuses_a_folder_without_a_tokenizer(model, prompts, tmp_path):
    folder = _copy_model(model, tmp_path)
    (folder / "tokenizer.model").unlink()
    (folder / "tokenizer_config.json").unlink()
    # a real interpreter: nothing printed while importing either (the other cases run in forks)
    assert_refused(_train(folder, prompts, tmp_path, fresh=True), "train", "model.hf_dir", "tokenizer")


def test_train_refuses_max_tokens_longer_than_the_context(model, prompts, tmp_path):
    result = _train(model["hf"], prompts, tmp_path, f"rollout.max_tokens={MAX_POSITIONS}")
    assert_refused(result, "train", "rollout.max_tokens", "max_position_embeddings", str(MAX_POSITIONS))


@pytest.mark.parametrize("which", ["data", "eval"])
def test_train_refuses_a_prompt_longer_than_the_context(model, tmp_path, which):
    records = arithmetic_prompts(4)
    good = write_jsonl(tmp_path / "good.jsonl", records)
    bad = write_jsonl(tmp_path / "long.jsonl", records[:1] + [{"prompt": LONG_PROMPT, "answer": "1"}])
    if which == "data":
        result = _train(model["hf"], bad, tmp_path)
        assert_refused(result, "train", f"{bad}:2", "rollout.max_tokens", str(MAX_POSITIONS))
    else:
        result = _train(model["hf"], good, tmp_path, f"eval.prompts={bad}", "eval.max_tokens=4", "eval.interval=1")
        assert_refused(result, "train", f"{bad}:2", "eval.max_tokens", str(MAX_POSITIONS))


def test_train_refuses_a_tensor_parallel_size_the_model_cannot_be_split_into(model, prompts, tmp_path):
    """TP4 on 2 KV heads, refused from WORLD_SIZE before torch.distributed is set up (today the
    single process would wait forever for the 3 other ranks)."""
    result = _train(model["hf"], prompts, tmp_path, "parallel.tensor=4", WORLD_SIZE="4")
    assert_refused(result, "train", "parallel.tensor", "num_key_value_heads", "4")
