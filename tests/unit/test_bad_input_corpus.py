"""The bad-input corpus (tests/data/bad/cases.yaml): every `rift` subcommand refuses each bad input
it can receive in one line, and keeps the output that was there.

Why a corpus: the refusal tests of each command (test_input_refusals.py, test_convert_refusals.py,
test_checkpoint_trust.py) show how particular refusals work; the corpus is the catalogue a user or
a reviewer reads to see what is refused and with which words, one entry per bad input, so adding a
case is adding a few lines of data. Text inputs are checked-in files; binary ones (weights,
checkpoints, buffers, Parquet) are derived at test time from the shared tiny model by a named
mutation, so nothing opaque is checked in, and a pickle payload exists only while its test runs.

Each case runs the real CLI in a subprocess and is held to the promise every refusal makes
(tests/cli_refusals.py `assert_refused`: exit 2, one stderr line `rift <command>: error: ...`
holding the case's fragments, nothing else); its output location is created beforehand with a
sentinel and must be unchanged; a planted payload (the YAML tags, the pickled .metadata) would
create RIFT_CORPUS_MARKER, which must not exist afterwards.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.cli_refusals import assert_refused, run_rift
from tests.environment import REPO_ROOT, subprocess_env
from tests.rollout_fixtures import arithmetic_prompts, scored_buffer, shared_tiny_model, write_jsonl

CORPUS = REPO_ROOT / "tests" / "data" / "bad"
MANIFEST = yaml.safe_load((CORPUS / "cases.yaml").read_text())
CASES = MANIFEST["cases"]
SENTINEL = "earlier output: a refused command must keep it\n"
PLACEHOLDER = re.compile(r"\{(data|tiny_hf|tiny_mcore|buffer|prompts|derived|out|work)\}")


# ------------------------------------------------------------------ named mutations (`mutate:`)


def _jsonl_to_parquet(path: Path) -> Path:
    """The JSON Lines file as a Parquet file of the same records (same name, .parquet)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    target = path.with_suffix(".parquet")
    pq.write_table(pa.Table.from_pylist(records), target)
    path.unlink()
    return target


def _safetensors_shape_lie(folder: Path, tensor: str, shape: list[int]) -> Path:
    """Rewrite model.safetensors' header so that `tensor` claims `shape` (its bytes unchanged):
    a header that lies about a shape, as a faulty writer or an edited file would have it."""
    path = folder / "model.safetensors"
    data = path.read_bytes()
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + size])
    header[tensor]["shape"] = shape
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + size:])
    return folder


def _flip_a_tensor_byte(checkpoint: Path) -> Path:
    """One tensor byte inverted after the checkpoint was written (its checksums unchanged)."""
    from tests.unit.test_checkpoint_trust import flip_a_tensor_byte

    flip_a_tensor_byte(checkpoint)
    return checkpoint


def _plant_payload_in_metadata(checkpoint: Path, marker: Path) -> Path:
    """A pickled os.system call in `.metadata`, checksums re-recorded as an attacker would: built
    here (tests/unit/test_checkpoint_trust.py shows it runs under plain unpickling)."""
    from rift_megatron.trust.checksums import write_checksums
    from tests.unit.test_checkpoint_trust import plant_in_metadata

    plant_in_metadata(checkpoint, marker)
    write_checksums(checkpoint)
    return checkpoint


def _edit_buffer(buffer: Path, edit: Callable[[Any], Any]) -> Path:
    import pyarrow.parquet as pq

    path = buffer / "rollout.parquet"
    pq.write_table(edit(pq.read_table(path)), path)
    return buffer


def _drop_column(buffer: Path, column: str) -> Path:
    return _edit_buffer(buffer, lambda table: table.drop_columns([column]))


def _cast_column(buffer: Path, column: str, type: str) -> Path:
    return _edit_buffer(buffer, lambda table: table.set_column(
        table.schema.get_field_index(column), column, table[column].cast(type)))


def _set_cell(buffer: Path, column: str, row: int, value: Any) -> Path:
    import pyarrow as pa

    def edit(table):
        values = table[column].to_pylist()
        values[row] = value
        index = table.schema.get_field_index(column)
        return table.set_column(index, column, pa.array(values, type=table.schema.field(index).type))

    return _edit_buffer(buffer, edit)


MUTATIONS: dict[str, Callable[..., Path]] = {
    "jsonl_to_parquet": _jsonl_to_parquet, "safetensors_shape_lie": _safetensors_shape_lie,
    "flip_a_tensor_byte": _flip_a_tensor_byte, "plant_payload_in_metadata": _plant_payload_in_metadata,
    "drop_column": _drop_column, "cast_column": _cast_column, "set_cell": _set_cell,
}


# ---------------------------------------------------------------------------------- the cases


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, str]:
    """The shared tiny model, its converted checkpoint, a good buffer and a good prompt file."""
    model = shared_tiny_model(tmp_path_factory)
    root = tmp_path_factory.mktemp("corpus-sources")
    buffer = scored_buffer(model["hf"], arithmetic_prompts(2, seed=3), root / "buffer")
    return {"data": str(CORPUS), "tiny_hf": str(model["hf"]), "tiny_mcore": str(model["mcore"]),
            "buffer": str(buffer), "prompts": str(write_jsonl(root / "prompts.jsonl", arithmetic_prompts(4)))}


def _fill(value: Any, places: dict[str, str]) -> Any:
    """`value` with the placeholders filled in, recursively (strings, lists, mappings)."""
    if isinstance(value, str):
        return PLACEHOLDER.sub(lambda match: places[match.group(1)], value)
    if isinstance(value, list):
        return [_fill(item, places) for item in value]
    if isinstance(value, dict):
        return {key: _fill(item, places) for key, item in value.items()}
    return value


def _flatten(argv: list) -> list[str]:
    return [str(leaf) for item in argv for leaf in (_flatten(item) if isinstance(item, list) else [item])]


def _derive(spec: dict, places: dict[str, str], target: Path) -> Path:
    """Copy `spec['from']` to `target`, then remove / write / truncate / mutate, in that order."""
    source = Path(places.get(spec["from"], _fill(spec["from"], places)))
    if source.is_dir():
        shutil.copytree(source, target)
    else:
        target.mkdir()
        target = Path(shutil.copy(source, target / source.name))
    for name in spec.get("remove", []):
        (target / name).unlink()
    for name, text in spec.get("write", {}).items():
        (target / name).write_text(text)
    for name, fraction in spec.get("truncate", {}).items():
        path = target / name
        with open(path, "r+b") as handle:
            handle.truncate(int(path.stat().st_size * fraction))
    if "mutate" in spec:
        args = dict(spec.get("args", {}))
        if spec["mutate"] == "plant_payload_in_metadata":
            args["marker"] = Path(places["work"]) / "payload-ran"
        target = MUTATIONS[spec["mutate"]](target, **args)
    return target


def _snapshot(out: Path) -> dict[str, str]:
    """Every file under `out` (or `out` itself) and its text."""
    if out.is_file():
        return {".": out.read_text()}
    return {str(path.relative_to(out)): path.read_text() for path in sorted(out.rglob("*")) if path.is_file()}


@pytest.mark.parametrize("case", CASES, ids=[case["id"] for case in CASES])
def test_a_bad_input_is_refused_in_one_line(sources, tmp_path, case):
    places = dict(sources, work=str(tmp_path), out=str(tmp_path / "out"))
    if "derive" in case:
        places["derived"] = str(_derive(case["derive"], places, tmp_path / "derived"))
    out = Path(places["out"])
    if case["out"] == "dir":
        out.mkdir()
        (out / "keep.txt").write_text(SENTINEL)
    else:
        out.write_text(SENTINEL)
    before = _snapshot(out)
    marker = tmp_path / "payload-ran"
    result = run_rift(*_flatten(_fill(case["argv"], places)), RIFT_CORPUS_MARKER=str(marker))
    assert_refused(result, case["command"], *_fill(case["expect"], places))
    assert _snapshot(out) == before, "a refused command changed the existing output"
    assert not marker.exists(), "a planted payload ran"


def test_the_yaml_payloads_are_live(tmp_path):
    """Control for the YAML-tag cases: an unsafe YAML loader runs the checked-in payload (so their
    refusal is the loader's doing, not an inert payload's)."""
    marker = tmp_path / "payload-ran"
    code = ("import sys, yaml; yaml.unsafe_load(open(sys.argv[1]).read())")
    subprocess.run([sys.executable, "-c", code, str(CORPUS / "configs" / "python_tag.yaml")],
                   env=subprocess_env(RIFT_CORPUS_MARKER=str(marker)), check=True, timeout=60)
    assert marker.exists()
