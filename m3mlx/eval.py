"""Model quality: perplexity over a text, and how far a model's predictions move from a
reference's: KL divergence, top-1 agreement and the change in the probability of the right
token, as llama.cpp's `perplexity --kl-divergence` reports them.

The text is read and tokenized piece by piece and cut into consecutive windows of `context`
tokens; in each window every position predicts the next token from the ones before it in the
window (context - 1 predictions per window). A window runs through the model in prefill
chunks with a cache, and its logits are made a few rows at a time, so memory holds one
window's cache and a few rows of logits, plus five numbers per scored token for the
statistics (the percentiles need them all).

The reference is a second model run alongside, or a file of its logits saved by an earlier
run (`save_logits`), so that a reference too large to sit next to the model runs once.
Reference files keep, per scored token, the log-probability of the right token and the
`top_k` largest log-probabilities with their token ids (the full distribution of a 200K
vocabulary would take 400 KB a token in fp16; top-64 takes 520 bytes). The KL divergence
from such a file treats the reference's mass outside its top-k as one outcome, which gives a
lower bound of the true KL that is exact when top_k covers the vocabulary; top-1 agreement,
perplexities and probability changes are exact either way.

Reference file layout: the 8 bytes `M3MLXREF`, a little-endian uint32 header length, a JSON
header (format version, context, top_k, vocab size), then one fixed-size record per window:
its int32 tokens [context], then per scored position the float32 log-probability of the right
token and the log of the probability outside the top_k, the int32 ids of the top_k most likely
tokens and their float32 log-probabilities, largest first. Written under a temporary name and renamed when the run completes.
"""

import json
import os
import struct
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, List, Optional, TextIO, Union

import mlx.core as mx
import numpy as np

from .checks import parse_json
from .defaults import INDEX_BITS, PREFILL_STEP
from .model import Model, make_cache
from .tokenizer import Tokenizer

MAGIC = b"M3MLXREF"
FORMAT_VERSION = 1
DEFAULT_CONTEXT = 512
DEFAULT_TOP_K = 64
TEXT_PIECE = 1 << 16  # characters tokenized at a time (then up to the end of that line)
LOGIT_BYTES = 64 << 20  # float32 logits made at once, per model


class EvalError(ValueError):
    """Bad input to an evaluation (data, reference, options), with what to do about it."""


# ----------------------------------------------------------------------------------------------
# Data: text -> windows of token ids


def read_pieces(stream: TextIO) -> Iterator[str]:
    """The text in pieces of about TEXT_PIECE characters, each ending at a line end."""
    while True:
        piece = stream.read(TEXT_PIECE)
        if not piece:
            return
        if not piece.endswith("\n"):
            piece += stream.readline()
        yield piece


def windows(tokenizer: Tokenizer, stream: TextIO, context: int,
            limit: Optional[int] = None) -> Iterator[np.ndarray]:
    """Consecutive windows of `context` token ids (int32), at most `limit` of them; a last
    partial window is dropped."""
    pending = np.zeros(0, np.int32)
    count = 0
    for piece in read_pieces(stream):
        pending = np.concatenate([pending, np.asarray(tokenizer.encode(piece), np.int32)])
        while len(pending) >= context:
            if limit is not None and count == limit:
                return
            yield pending[:context]
            pending = pending[context:]
            count += 1


def open_text(data: Union[str, os.PathLike, None]) -> TextIO:
    """'-' is stdin; None the held-out Python text that ships with m3mlx."""
    if data is None:
        from .demo import HELDOUT_TEXT

        data = HELDOUT_TEXT
    if str(data) == "-":
        return sys.stdin
    path = Path(data).expanduser()
    if not path.is_file():
        raise EvalError(f"--data {data}: no such file (pass a text file, or - for stdin)")
    return open(path, encoding="utf-8", errors="replace")


# ----------------------------------------------------------------------------------------------
# Log-probabilities of one window, a few rows at a time


def logprob_chunks(model: Model, tokens: np.ndarray, prefill_step: int = PREFILL_STEP,
                   index_bits: Optional[int] = INDEX_BITS) -> Iterator[mx.array]:
    """float32 log-probabilities [rows, vocab] for positions 0 .. context-2 of the window, in
    order, in chunks of rows (each position predicts the token after it). The cache stores MSA
    index keys as generation does (`index_bits`)."""
    lm = model.language_model
    cache = make_cache(model, index_bits)
    rows = max(1, LOGIT_BYTES // (4 * model.args.vocab_size))
    inputs = mx.array(tokens[:-1])[None]
    for start in range(0, inputs.shape[1], prefill_step):
        hidden = lm.model(inputs[:, start:start + prefill_step], cache=cache)
        mx.eval(hidden, [c.state for c in cache])
        for r in range(0, hidden.shape[1], rows):
            logits = lm.logits(hidden[0, r:r + rows]).astype(mx.float32)
            yield logits - mx.logsumexp(logits, axis=-1, keepdims=True)


# ----------------------------------------------------------------------------------------------
# Saved reference logits


@dataclass
class ReferenceHeader:
    context: int
    top_k: int
    vocab: int

    @property
    def row_dtype(self) -> list:
        """One scored position: the right token's log-probability, then the top-k."""
        return [("target", "<f4"), ("rest", "<f4"), ("ids", "<i4", (self.top_k,)),
                ("top", "<f4", (self.top_k,))]

    @property
    def record_bytes(self) -> int:
        """One window: its tokens, then a row per scored position."""
        return 4 * self.context + (self.context - 1) * np.dtype(self.row_dtype).itemsize


class ReferenceWriter:
    """Writes a reference file under a temporary name; `close()` puts it in place."""

    def __init__(self, path, header: ReferenceHeader):
        self.path = Path(path)
        self.temp = self.path.with_name(self.path.name + ".partial")
        try:
            self.file = open(self.temp, "wb")
        except OSError as e:
            raise EvalError(f"--save-logits {path}: cannot write there ({e.strerror})") from None
        meta = json.dumps({"version": FORMAT_VERSION, "context": header.context,
                           "top_k": header.top_k, "vocab": header.vocab}).encode()
        self.file.write(MAGIC + struct.pack("<I", len(meta)) + meta)
        self.rows = np.dtype(header.row_dtype)

    def begin_window(self, tokens: np.ndarray):
        self.file.write(np.ascontiguousarray(tokens, np.int32).tobytes())

    def write_rows(self, target, rest, ids, top):
        rows = np.empty(len(target), self.rows)
        rows["target"], rows["rest"], rows["ids"], rows["top"] = target, rest, ids, top
        self.file.write(rows.tobytes())

    def close(self):
        self.file.close()
        os.replace(self.temp, self.path)

    def abort(self):
        self.file.close()
        self.temp.unlink(missing_ok=True)


class ReferenceReader:
    """Reads a reference file window by window."""

    def __init__(self, path):
        self.path = Path(path)
        size = self.path.stat().st_size
        self.file = open(self.path, "rb")
        head = self.file.read(12)
        if len(head) < 12 or head[:8] != MAGIC:
            raise EvalError(f"{path} is not an m3mlx reference-logits file (made by "
                            "`m3mlx eval --save-logits`)")
        (n,) = struct.unpack("<I", head[8:])
        try:
            meta = parse_json(self.file.read(n))
            self.header = ReferenceHeader(int(meta["context"]), int(meta["top_k"]),
                                          int(meta["vocab"]))
            version = meta["version"]
        except (ValueError, KeyError, TypeError) as e:
            raise EvalError(f"{path}: corrupt header ({e}); save the reference logits again")
        if version != FORMAT_VERSION:
            raise EvalError(f"{path} is format version {version}; this m3mlx reads version "
                            f"{FORMAT_VERSION}: save the reference logits again")
        h = self.header
        if h.context < 2 or not 1 <= h.top_k <= h.vocab:
            raise EvalError(f"{path}: corrupt header (context {h.context}, top_k {h.top_k}, "
                            f"vocab {h.vocab}); save the reference logits again")
        data = size - 12 - n
        if data % h.record_bytes:
            raise EvalError(f"{path} is truncated (its last window is incomplete); save the "
                            "reference logits again")
        self.windows = data // h.record_bytes

    def read(self):
        """(tokens [context], right-token logprobs [n], log of the rest [n], top ids [n, k],
        their logprobs [n, k]) of the next window."""
        h = self.header
        raw = self.file.read(h.record_bytes)
        tokens = np.frombuffer(raw, np.int32, h.context)
        rows = np.frombuffer(raw, np.dtype(h.row_dtype), h.context - 1, 4 * h.context)
        if rows["ids"].min() < 0 or rows["ids"].max() >= h.vocab:
            raise EvalError(f"{self.path}: token ids outside the vocabulary; the file is corrupt")
        return tokens, rows["target"], rows["rest"], rows["ids"], rows["top"]

    def close(self):
        self.file.close()


def top_logprobs(lp: mx.array, k: int):
    """(ids, log-probabilities) of the k most likely tokens per row, largest first, and the
    log of the probability of all the others (-inf when k covers the vocabulary)."""
    ids = mx.argpartition(-lp, kth=k - 1, axis=-1)[:, :k] if k < lp.shape[-1] else \
        mx.broadcast_to(mx.arange(lp.shape[-1]), lp.shape)
    vals = mx.take_along_axis(lp, ids, axis=-1)
    order = mx.argsort(-vals, axis=-1)
    return (mx.take_along_axis(ids, order, axis=-1), mx.take_along_axis(vals, order, axis=-1),
            rest_logprob(lp, ids))


def rest_logprob(lp: mx.array, ids: mx.array) -> mx.array:
    """log of the probability outside `ids`, per row: summed over the others, not 1 minus the
    top, which would cancel away a small rest."""
    outside = mx.put_along_axis(mx.ones(lp.shape, mx.bool_), ids, mx.array(False), axis=-1)
    return mx.logsumexp(mx.where(outside, lp, -mx.inf), axis=-1)


def grouped_kl(ref_ids: mx.array, ref_top: mx.array, ref_rest: mx.array,
               lp: mx.array) -> mx.array:
    """KL(reference || model) per row, the reference's mass outside its top-k taken as one
    outcome (against the model's mass outside those same ids)."""
    head = (mx.exp(ref_top) * (ref_top - mx.take_along_axis(lp, ref_ids, axis=-1))).sum(axis=-1)
    rest = rest_logprob(lp, ref_ids)
    tail = mx.where(ref_rest > -mx.inf, mx.exp(ref_rest) * (ref_rest - rest), 0.0)
    return head + tail


# ----------------------------------------------------------------------------------------------
# The evaluation


@dataclass
class EvalResult:
    context: int
    windows: int
    seconds: float
    nll: np.ndarray  # per scored token: -log p(right token)
    ref_nll: Optional[np.ndarray] = None
    kld: Optional[np.ndarray] = None
    same_top: Optional[np.ndarray] = None  # bool: the model's and the reference's argmax agree
    dp: Optional[np.ndarray] = None  # p(right token) minus the reference's
    ref_top_k: Optional[int] = None  # saved reference: its top-k (KLD exact when k == vocab)
    vocab: int = 0
    notes: List[str] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return int(self.nll.size)

    @property
    def tokens_per_second(self) -> float:
        return self.windows * self.context / max(self.seconds, 1e-9)

    @property
    def perplexity(self) -> float:
        return float(np.exp(self.nll.mean()))

    @property
    def ref_perplexity(self) -> Optional[float]:
        return None if self.ref_nll is None else float(np.exp(self.ref_nll.mean()))

    def summary(self) -> dict:
        """The headline numbers as a flat dict (what `--json` prints)."""
        out = {"context": self.context, "windows": self.windows, "tokens": self.tokens,
               "perplexity": self.perplexity, "tokens_per_second": self.tokens_per_second}
        if self.kld is not None:
            q = np.quantile(self.kld, [0.5, 0.99, 0.999])
            out.update(reference_perplexity=self.ref_perplexity,
                       kld_mean=float(self.kld.mean()), kld_median=float(q[0]),
                       kld_p99=float(q[1]), kld_p999=float(q[2]), kld_max=float(self.kld.max()),
                       same_top=float(self.same_top.mean()),
                       rms_dp=float(np.sqrt(np.mean(self.dp.astype(np.float64) ** 2))))
        return out


def evaluate(model: Model, tokenizer: Tokenizer, data=None, *, context: Optional[int] = None,
             samples: Optional[int] = None, reference=None, save_logits=None,
             top_k: int = DEFAULT_TOP_K, prefill_step: int = PREFILL_STEP,
             index_bits: Optional[int] = INDEX_BITS,
             progress: Optional[Callable[[int, Optional[int], int], None]] = None) -> EvalResult:
    """Perplexity of `model` over `data` (a text file path, '-' for stdin, or None for the
    held-out Python text that ships with m3mlx), in windows of `context` tokens, at most
    `samples` windows; against `reference` (a Model, or the path of a saved reference-logits
    file) also the KL divergence and its friends. `save_logits` writes this model's logits
    (top_k per token) for later runs to use as their reference. `progress(windows done,
    windows expected or None, tokens done)` is called after each window. `index_bits` is how
    the caches store MSA index keys, as in generation (16: unquantized)."""
    saved = None
    if reference is not None and not isinstance(reference, Model):
        saved = ReferenceReader(reference)
        h = saved.header
        if context is not None and context != h.context:
            raise EvalError(f"{reference} holds logits for windows of {h.context} tokens; run "
                            f"with --context {h.context} (or save a reference at {context})")
        if h.vocab != model.args.vocab_size:
            raise EvalError(f"{reference} was saved by a model with a vocabulary of {h.vocab}, "
                            f"this one has {model.args.vocab_size}: not the same tokenizer")
        context = h.context
        samples = saved.windows if samples is None else min(samples, saved.windows)
    elif isinstance(reference, Model) and reference.args.vocab_size != model.args.vocab_size:
        raise EvalError(f"the reference model's vocabulary ({reference.args.vocab_size}) differs "
                        f"from the model's ({model.args.vocab_size})")
    context = DEFAULT_CONTEXT if context is None else context
    if context < 2:
        raise EvalError(f"--context {context}: a window needs at least 2 tokens")
    if samples is not None and samples < 1:
        raise EvalError(f"--samples {samples}: evaluate at least one window")
    if not 1 <= top_k <= model.args.vocab_size:
        raise EvalError(f"top_k {top_k} must be between 1 and the vocabulary size "
                        f"({model.args.vocab_size})")

    writer = None
    if save_logits is not None:
        writer = ReferenceWriter(save_logits, ReferenceHeader(context, top_k,
                                                              model.args.vocab_size))
    stream = open_text(data)
    parts = {k: [] for k in ("nll", "ref_nll", "kld", "same", "dp")}
    start, done = time.perf_counter(), 0
    try:
        for tokens in windows(tokenizer, stream, context, samples):
            ref = saved.read() if saved is not None else None
            if ref is not None and not np.array_equal(ref[0], tokens):
                raise EvalError(f"window {done} of the data differs from the one {reference} "
                                "was saved on: use the same --data (and tokenizer) as the run "
                                "that saved it")
            _score_window(model, tokens, reference, ref, writer, top_k, parts,
                          prefill_step=prefill_step, index_bits=index_bits)
            done += 1
            if progress is not None:
                progress(done, samples, done * context)
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    finally:
        if stream is not sys.stdin:
            stream.close()
        if saved is not None:
            saved.close()
    if done == 0:
        raise EvalError(f"the data holds fewer than {context} tokens: nothing to evaluate "
                        "(pass a longer text or a smaller --context)")
    if writer is not None:
        writer.close()
    seconds = time.perf_counter() - start
    cat = {k: np.concatenate(v) if v else None for k, v in parts.items()}
    result = EvalResult(context, done, seconds, cat["nll"], cat["ref_nll"], cat["kld"],
                        cat["same"], cat["dp"], vocab=model.args.vocab_size)
    if saved is not None:
        result.ref_top_k = saved.header.top_k
    return result


def _score_window(model, tokens, reference, ref, writer, top_k, parts, **run):
    """Score one window's predictions into `parts`; save this model's rows to `writer`. `run`:
    logprob_chunks' prefill_step and index_bits."""
    targets = mx.array(tokens[1:])
    live = logprob_chunks(reference, tokens, **run) if isinstance(reference, Model) else None
    if writer is not None:
        writer.begin_window(tokens)
    row = 0
    for lp in logprob_chunks(model, tokens, **run):
        n = lp.shape[0]
        t = targets[row:row + n, None]
        nll = -mx.take_along_axis(lp, t, axis=-1)[:, 0]
        out = {"nll": nll}
        if writer is not None:
            out["ids"], out["top"], out["rest"] = top_logprobs(lp, top_k)
        if live is not None:
            rlp = next(live)
            out["ref_nll"] = -mx.take_along_axis(rlp, t, axis=-1)[:, 0]
            out["kld"] = (mx.exp(rlp) * (rlp - lp)).sum(axis=-1)
            out["same"] = mx.argmax(rlp, axis=-1) == mx.argmax(lp, axis=-1)
        elif ref is not None:
            _, target, rest, ids, top = (a[row:row + n] for a in ref)
            ref_ids = mx.array(ids)
            out["ref_nll"] = -mx.array(target)
            out["kld"] = grouped_kl(ref_ids, mx.array(top), mx.array(rest), lp)
            out["same"] = ref_ids[:, 0] == mx.argmax(lp, axis=-1)
        mx.eval(out)
        out = {k: np.array(v) for k, v in out.items()}
        if writer is not None:
            writer.write_rows(-out["nll"], out["rest"], out["ids"], out["top"])
        nll = out["nll"].astype(np.float64)
        parts["nll"].append(nll)
        if "kld" in out:
            ref_nll = out["ref_nll"].astype(np.float64)
            parts["ref_nll"].append(ref_nll)
            parts["kld"].append(np.maximum(out["kld"], 0.0))  # rounding can dip below 0
            parts["same"].append(out["same"])
            parts["dp"].append(np.exp(-nll) - np.exp(-ref_nll))
        row += n


# ----------------------------------------------------------------------------------------------
# The report


def _se(x: np.ndarray) -> float:
    """Standard error of the mean (tokens taken as independent, as llama.cpp does)."""
    return float(x.std(ddof=1) / np.sqrt(x.size)) if x.size > 1 else 0.0


def format_report(r: EvalResult, model_name: str = "model",
                  reference_name: str = "reference") -> str:
    ppl, nll_se = r.perplexity, _se(r.nll)
    lines = [f"{r.windows} windows of {r.context} tokens, {r.tokens} predictions scored, "
             f"{r.tokens_per_second:.0f} tokens/s ({r.seconds:.1f}s)", "",
             "perplexity",
             f"  PPL({model_name}){'':<{max(0, 12 - len(model_name))}} {ppl:12.4f} "
             f"± {ppl * nll_se:.4f}"]
    if r.kld is None:
        return "\n".join(lines)
    ref_ppl = r.ref_perplexity
    diff = r.nll - r.ref_nll
    corr = float(np.corrcoef(r.nll, r.ref_nll)[0, 1]) if r.tokens > 1 else 1.0
    ratio = float(np.exp(diff.mean()))
    lines += [
        f"  PPL({reference_name}){'':<{max(0, 12 - len(reference_name))}} {ref_ppl:12.4f} "
        f"± {ref_ppl * _se(r.ref_nll):.4f}",
        f"  ln(PPL ratio)     {diff.mean():12.6f} ± {_se(diff):.6f}",
        f"  PPL ratio         {ratio:12.6f} ± {ratio * _se(diff):.6f}",
        f"  correlation of ln(p), model vs reference: {100 * corr:.2f}%",
        "",
        "KL divergence (reference || model), nats per token" + (
            f"; reference top-{r.ref_top_k} saved, the rest as one outcome (a lower bound)"
            if r.ref_top_k is not None and r.ref_top_k < r.vocab else ""),
        f"  mean              {r.kld.mean():12.6f} ± {_se(r.kld):.6f}",
    ]
    for label, q in (("maximum", 1.0), ("99.9%", 0.999), ("99.0%", 0.99), ("95.0%", 0.95),
                     ("90.0%", 0.9), ("median", 0.5), ("10.0%", 0.1), ("minimum", 0.0)):
        lines.append(f"  {label:<17} {np.quantile(r.kld, q):12.6f}")
    dp = 100 * r.dp
    same = r.same_top.astype(np.float64)
    rms = float(np.sqrt(np.mean(dp**2)))
    # Standard error of the RMS by the delta method: se(mean of squares) / (2 rms).
    rms_se = _se(dp**2) / (2 * rms) if rms > 0 else 0.0
    lines += ["", "probability of the right token: model minus reference, percentage points",
              f"  mean Δp           {dp.mean():12.4f} ± {_se(dp):.4f}"]
    for label, q in (("maximum", 1.0), ("99.9%", 0.999), ("99.0%", 0.99), ("median", 0.5),
                     ("1.0%", 0.01), ("0.1%", 0.001), ("minimum", 0.0)):
        lines.append(f"  {label:<17} {np.quantile(dp, q):12.4f}")
    lines += [f"  RMS Δp            {rms:12.4f} ± {rms_se:.4f}",
              f"  same top token    {100 * same.mean():11.3f}% ± {100 * _se(same):.3f}"]
    return "\n".join(lines)
