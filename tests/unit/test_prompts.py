"""Tests of rift_megatron.data: prompt files (JSON Lines / Parquet) and their errors, prompt
rendering with a local tokenizer and chat template, and the resumable prompt sampler."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rift_megatron.data import PromptFileError, PromptRecord, PromptSampler, load_prompts, render_prompt

# ------------------------------------------------------------------------------- prompt files


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def write_parquet(path: Path, columns: dict[str, list]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), path)
    return path


def test_jsonl_round_trip_with_unicode_numbers_and_blank_lines(tmp_path):
    rows = [
        {"prompt": "What is 2+2?", "answer": "4", "source": "toy"},
        {"prompt": "Combien font 1,5 × 2 ? — 答え", "answer": 3},
        {"prompt": "π to two places?", "answer": 3.14},
    ]
    lines = [json.dumps(rows[0]), "", json.dumps(rows[1], ensure_ascii=False), "   ", json.dumps(rows[2])]
    path = write_lines(tmp_path / "p.jsonl", lines)
    assert load_prompts(path) == [
        PromptRecord(0, "What is 2+2?", "4"),
        PromptRecord(1, "Combien font 1,5 × 2 ? — 答え", "3"),
        PromptRecord(2, "π to two places?", "3.14"),
    ]


def test_numeric_answers_keep_the_text_written_in_the_file(tmp_path):
    # Mixed string/number answers: `datasets` would decode the string "1.50" to 1.5; we must not.
    path = write_lines(tmp_path / "p.json", [
        '{"prompt": "a", "answer": "1.50"}',
        '{"prompt": "b", "answer": 1.50}',
        '{"prompt": "c", "answer": 12345678901234567890123}',
        '{"prompt": "d", "answer": "[1, 2]"}',
        '{"prompt": "e", "answer": 1e3}',
    ])
    answers = [r.answer for r in load_prompts(path)]
    assert answers == ["1.50", "1.50", "12345678901234567890123", "[1, 2]", "1e3"]
    assert all(type(a) is str for a in answers)


def test_jsonl_custom_field_names(tmp_path):
    path = write_lines(tmp_path / "p.jsonl", ['{"problem": "x?", "solution": "y", "prompt": 7}'])
    assert load_prompts(path, prompt_field="problem", answer_field="solution") == [PromptRecord(0, "x?", "y")]


def test_utf8_byte_order_mark_is_accepted(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b'{"prompt": "q", "answer": "a"}\n')
    assert load_prompts(path) == [PromptRecord(0, "q", "a")]


def test_parquet_round_trip_custom_fields_numbers_unicode(tmp_path):
    path = write_parquet(tmp_path / "p.parquet", {
        "question": ["What is 2+2?", "Ünïcødé — 問題"],
        "gold": [4, 17],
        "other": [1.0, 2.0],
    })
    assert load_prompts(path, prompt_field="question", answer_field="gold") == [
        PromptRecord(0, "What is 2+2?", "4"),
        PromptRecord(1, "Ünïcødé — 問題", "17"),
    ]


def test_parquet_written_by_datasets(tmp_path):
    import datasets

    path = tmp_path / "d.parquet"
    datasets.Dataset.from_dict({"prompt": ["a", "b", "c"], "answer": ["1", "2", "3"]}).to_parquet(str(path))
    assert load_prompts(path) == [PromptRecord(i, p, a) for i, (p, a) in enumerate(zip("abc", "123"))]


def assert_error(path, match_parts, **kwargs):
    with pytest.raises(PromptFileError) as info:
        load_prompts(path, **kwargs)
    message = str(info.value)
    for part in match_parts:
        assert part in message, f"{part!r} not in {message!r}"
    return message


GOOD = '{"prompt": "q", "answer": "a"}'


@pytest.mark.parametrize(
    "lines, line_no, words",
    [
        ([GOOD, GOOD, '{"prompt": "q", "answer": '], 3, "malformed JSON"),
        ([GOOD, '{"answer": "a"}', GOOD], 2, "missing field 'prompt'"),
        ([GOOD, '{"prompt": "q"}'], 2, "missing field 'answer'"),
        (['{"prompt": "", "answer": "a"}'], 1, "'prompt' is empty"),
        ([GOOD, GOOD, GOOD, '{"prompt": "   ", "answer": "a"}'], 4, "'prompt' is empty"),
        ([GOOD, '{"prompt": 5, "answer": "a"}'], 2, "must be a string"),
        ([GOOD, '{"prompt": null, "answer": "a"}'], 2, "must be a string, got null"),
        ([GOOD, '{"prompt": "q", "answer": null}'], 2, "'answer' must be a string or a number"),
        ([GOOD, '{"prompt": "q", "answer": true}'], 2, "'answer' must be a string or a number"),
        (['{"prompt": "q", "answer": ""}'], 1, "'answer' is empty"),
        ([GOOD, "", '["q", "a"]'], 3, "expected a JSON object"),
        ([GOOD, '{"prompt": "q", "answer": NaN}'], 2, "malformed JSON"),
        (["[", GOOD, "]"], 1, "JSON Lines"),
    ],
)
def test_jsonl_errors_name_file_and_line(tmp_path, lines, line_no, words):
    path = write_lines(tmp_path / "bad_prompts.jsonl", lines)
    assert_error(path, [f"bad_prompts.jsonl:{line_no}:", words])


def test_jsonl_invalid_utf8_names_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(GOOD.encode() + b"\n" + '{"prompt": "café", "answer": "a"}\n'.encode("latin-1"))
    assert_error(path, ["latin1.jsonl:2:", "UTF-8"])


@pytest.mark.parametrize("content", ["", "\n\n   \n"])
def test_empty_jsonl_file(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    assert_error(path, ["empty.jsonl", "empty"])


def test_missing_file(tmp_path):
    assert_error(tmp_path / "nowhere.jsonl", ["nowhere.jsonl", "not found"])
    assert_error(tmp_path / "nowhere.parquet", ["nowhere.parquet", "not found"])


def test_unknown_extension_lists_supported(tmp_path):
    path = tmp_path / "prompts.csv"
    path.write_text("prompt,answer\nq,a\n")
    assert_error(path, ["prompts.csv", ".csv", ".jsonl", ".json", ".parquet"])


def test_parquet_missing_column(tmp_path):
    path = write_parquet(tmp_path / "cols.parquet", {"prompt": ["q"], "solution": ["a"]})
    assert_error(path, ["cols.parquet", "missing column 'answer'", "solution"])


@pytest.mark.parametrize(
    "prompts, answers, row, words",
    [
        (["q", "q", None], ["a", "a", "a"], 2, "must be a string, got null"),
        (["q", ""], ["a", "a"], 1, "'prompt' is empty"),
        (["q", "q"], ["a", None], 1, "'answer' must be a string or a number"),
    ],
)
def test_parquet_bad_rows_name_file_and_row(tmp_path, prompts, answers, row, words):
    path = write_parquet(tmp_path / "rows.parquet", {"prompt": prompts, "answer": answers})
    assert_error(path, ["rows.parquet", f"row {row}", words])


def test_parquet_empty_and_corrupt(tmp_path):
    import pyarrow as pa

    empty = write_parquet(tmp_path / "empty.parquet", {
        "prompt": pa.array([], pa.string()), "answer": pa.array([], pa.string())})
    assert_error(empty, ["empty.parquet", "empty"])
    corrupt = tmp_path / "corrupt.parquet"
    corrupt.write_bytes(b"this is not parquet at all")
    assert_error(corrupt, ["corrupt.parquet", "cannot read Parquet"])


# ---------------------------------------------------------------------------------- rendering

VOCAB = ["<pad>", "<unk>", "<s>", "</s>", "<user>", "<assistant>", "what", "is", "2+2", "?", "héllo"]
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def make_tokenizer(chat_template: str | None):
    from tokenizers import Tokenizer, processors
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(VOCAB)}
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", vocab["<s>"])]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    tok.add_special_tokens({"additional_special_tokens": ["<user>", "<assistant>"]})
    tok.chat_template = chat_template
    return tok


def test_render_with_chat_template_matches_the_template_text():
    tok = make_tokenizer(TEMPLATE)
    ids = render_prompt(tok, "what is 2+2 ?", chat_template=True)
    v = {w: i for i, w in enumerate(VOCAB)}
    # By hand: "<s><user> what is 2+2 ? <assistant>", BOS only once (from the template).
    assert ids == [v["<s>"], v["<user>"], v["what"], v["is"], v["2+2"], v["?"], v["<assistant>"]]
    text = tok.apply_chat_template(
        [{"role": "user", "content": "what is 2+2 ?"}], add_generation_prompt=True, tokenize=False
    )
    assert text == "<s><user> what is 2+2 ? <assistant>"
    assert ids == tok(text, add_special_tokens=False)["input_ids"]
    assert all(type(i) is int for i in ids)


def test_render_without_chat_template_uses_special_tokens():
    tok = make_tokenizer(TEMPLATE)
    v = {w: i for i, w in enumerate(VOCAB)}
    assert render_prompt(tok, "héllo ?", chat_template=False) == [v["<s>"], v["héllo"], v["?"]]
    assert render_prompt(make_tokenizer(None), "what is", chat_template=False) == [v["<s>"], v["what"], v["is"]]


def test_chat_template_requested_but_missing_is_an_error():
    with pytest.raises(ValueError, match="no chat template"):
        render_prompt(make_tokenizer(None), "what is 2+2 ?", chat_template=True)


# ------------------------------------------------------------------------------------ sampler


def draw(sampler: PromptSampler, steps: int) -> list[list[int]]:
    return [sampler.next_batch() for _ in range(steps)]


def test_sampler_is_deterministic_and_seed_dependent():
    a = draw(PromptSampler(50, 8, seed=3), 20)
    assert a == draw(PromptSampler(50, 8, seed=3), 20)
    assert a != draw(PromptSampler(50, 8, seed=4), 20)
    assert all(len(batch) == 8 for batch in a)


@pytest.mark.parametrize("num_prompts, per_step", [(12, 4), (10, 4), (7, 3), (5, 12), (1, 1)])
def test_every_prompt_once_per_epoch(num_prompts, per_step):
    sampler = PromptSampler(num_prompts, per_step, seed=11)
    stream = [i for batch in draw(sampler, 60) for i in batch]
    epochs = [stream[k : k + num_prompts] for k in range(0, len(stream) - num_prompts + 1, num_prompts)]
    assert len(epochs) >= 3
    for e, chunk in enumerate(epochs):
        assert sorted(chunk) == list(range(num_prompts))
        assert chunk == sampler.epoch_order(e)
    if num_prompts > 2:
        assert epochs[0] != epochs[1]  # reshuffled every epoch
        assert epochs[0] != list(range(num_prompts))


def test_shuffle_false_keeps_file_order():
    assert draw(PromptSampler(5, 3, shuffle=False), 3) == [[0, 1, 2], [3, 4, 0], [1, 2, 3]]


@pytest.mark.parametrize("stop_after", [1, 2, 3, 5, 7])  # mid-epoch and right at/after boundaries
def test_resume_reproduces_the_uninterrupted_stream(stop_after):
    uninterrupted = draw(PromptSampler(10, 4, seed=5), 12)
    first = PromptSampler(10, 4, seed=5)
    head = draw(first, stop_after)
    state = json.loads(json.dumps(first.state_dict()))  # survives a checkpoint round trip
    resumed = PromptSampler(10, 4, seed=5)
    resumed.load_state_dict(state)
    assert head + draw(resumed, 12 - stop_after) == uninterrupted


def test_resume_state_at_an_exact_epoch_boundary():
    sampler = PromptSampler(8, 4, seed=1)
    draw(sampler, 2)
    assert sampler.state_dict()["epoch"] == 1 and sampler.state_dict()["position"] == 0
    resumed = PromptSampler(8, 4, seed=1)
    resumed.load_state_dict(sampler.state_dict())
    assert draw(resumed, 3) == draw(sampler, 3)


@pytest.mark.parametrize("dp_size", [1, 2, 4])
def test_global_stream_independent_of_dp_size_and_shards_cover_it(dp_size):
    reference = draw(PromptSampler(30, 8, seed=2), 10)
    # A run on dp_size ranks: each rank has its own sampler and keeps its shard.
    ranks = [PromptSampler(30, 8, seed=2) for _ in range(dp_size)]
    for step, global_batch in enumerate(reference):
        shards = [PromptSampler.shard(s.next_batch(), r, dp_size) for r, s in enumerate(ranks)]
        assert all(len(shard) == 8 // dp_size for shard in shards)
        assert [i for shard in shards for i in shard] == global_batch, step


def test_resume_on_a_different_dp_size():
    reference = draw(PromptSampler(30, 8, seed=9), 8)
    saved = PromptSampler(30, 8, seed=9)
    draw(saved, 3)  # trained 3 steps on 4 ranks
    for rank_sampler_count in (1, 2):  # resumed on 1 or 2 ranks
        ranks = [PromptSampler(30, 8, seed=9) for _ in range(rank_sampler_count)]
        for s in ranks:
            s.load_state_dict(saved.state_dict())
        for step in range(3, 8):
            merged = [
                i for r, s in enumerate(ranks)
                for i in PromptSampler.shard(s.next_batch(), r, rank_sampler_count)
            ]
            assert merged == reference[step]


def test_sampler_argument_and_state_errors():
    with pytest.raises(ValueError, match="num_prompts"):
        PromptSampler(0, 4)
    with pytest.raises(ValueError, match="prompts_per_step"):
        PromptSampler(10, 0)
    with pytest.raises(ValueError, match="seed"):
        PromptSampler(10, 2, seed=-1)
    with pytest.raises(ValueError, match="integer"):
        PromptSampler(10.0, 2)
    with pytest.raises(ValueError, match="does not split evenly over 3"):
        PromptSampler.shard(list(range(8)), 0, 3)
    with pytest.raises(ValueError, match="dp_rank"):
        PromptSampler.shard(list(range(8)), 2, 2)
    state = PromptSampler(10, 2, seed=1).state_dict()
    with pytest.raises(ValueError, match="prompt file changed"):
        PromptSampler(11, 2, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="seed 1"):
        PromptSampler(10, 2, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="missing"):
        PromptSampler(10, 2, seed=1).load_state_dict({"seed": 1})
    with pytest.raises(ValueError, match="position"):
        PromptSampler(10, 2, seed=1).load_state_dict({**state, "position": 10})


def test_prompts_per_step_may_change_on_resume():
    stream = [i for b in draw(PromptSampler(9, 3, seed=4), 6) for i in b]
    first = PromptSampler(9, 3, seed=4)
    head = [i for b in draw(first, 2) for i in b]
    resumed = PromptSampler(9, 6, seed=4)
    resumed.load_state_dict(first.state_dict())
    assert head + [i for b in draw(resumed, 2) for i in b] == stream[:18]
