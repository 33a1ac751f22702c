"""Benchmark: bytes per stored top-k entry at a real vocabulary (V = 151,936 and 128,256, ids
above 65,535), and the KL the compact encoding's quantisation costs.

    python benchmarks/vocab_bytes.py --out runs/bench-vocab-bytes

Run by hand (not a test); prints a Markdown report and writes it with the raw numbers to
`--out`. No model is needed: a synthetic teacher draws, per target position,

* its k candidate ids: the first k distinct draws from a Zipf law over the vocabulary
  (frequency rank rho has probability proportional to rho^-zipf), mapped to ids roughly in
  frequency order, as BPE assigns them (the rank's log plus N(0, 1) noise, sorted); so, as in
  a real LM, frequent tokens are in most top-k lists and the rest of the list is spread over
  the vocabulary;
* its distribution over the ranks r = 1..V: log-prob gaps c * log(r / (r - 1)), each scaled
  by a log-normal factor (sigma `jitter`, mean 1) up to rank k and exact beyond, i.e. a power
  law p(r) ~ r^-c with an irregular head. The exponent c varies across positions (a
  log-normal around the teacher's median, drawn from a grid of 256 values so that the tail
  mass and entropy of every position are exact sums over all V ranks). A larger c is a more
  confident teacher;
* the actual next token from that distribution.

The cache is written through kdpipe's own shard writer (`write_shard`: the table `build_table`
makes, the Parquet options `shard.parquet_options` gives) and read back through its reader
(`decode_row_group`); the KL is from the exact float32 top-k + tail partition to the decoded
one, renormalised as the trainer does. Then the same table is written again with other Parquet
options, keeping kdpipe's everything else: the column encodings of the top-k columns
(dictionary, BYTE_STREAM_SPLIT, neither, and for the compact encoding the sorted ids
themselves under Parquet's DELTA_BINARY_PACKED instead of kdpipe's own delta step) and the
zstd level.

`--cache DIR` (repeatable; `--vocabs ''` for no synthetic teacher) measures a real teacher's
plain top-k cache the same way: its stored log-probs stand for the teacher, so make it with
`cache-teacher --logprob-dtype float32` to measure float16's distortion as well.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from synthetic_teacher import TEACHERS, Positions, Teacher, draw_positions, sequences_of

from kdpipe.schemas import shard as cols
from kdpipe.schemas.cache import open_cache
from kdpipe.schemas.encoding import LOGPROB_STEP, encode_topk
from kdpipe.schemas.shard import ShardLayout, id_dtype_for_vocab, parquet_leaf, parquet_options
from kdpipe.schemas.shard_reader import Columns, decode_row_group
from kdpipe.schemas.shard_writer import SequenceTargets, build_table, write_shard

VOCABS = (151_936, 128_256)  # Qwen2/2.5 heads, Llama 3


def column_bytes(path: Path) -> dict[str, int]:
    """Compressed bytes per top-level column of one Parquet file."""
    meta = pq.ParquetFile(path).metadata
    sizes: dict[str, int] = {}
    for g in range(meta.num_row_groups):
        for c in range(meta.num_columns):
            chunk = meta.row_group(g).column(c)
            name = chunk.path_in_schema.split(".")[0]
            sizes[name] = sizes.get(name, 0) + chunk.total_compressed_size
    return sizes


TOPK_COLUMNS = {"plain": (cols.TOPK_IDS, cols.TOPK_LOGPROBS),
                "compact": (cols.TOPK_ID_DELTAS, cols.TOPK_LOGPROB_Q)}
SORTED_IDS = "topk_ids_sorted"  # benchmark only: the compact ids before kdpipe's delta step


def variants(encoding: str) -> dict[str, dict[str, Any]]:
    """Parquet options to compare for the top-k columns: name -> overrides of
    `parquet_options` (`ids`/`values`: "dictionary", "byte_stream_split", "plain" or
    "delta_binary_packed" on the sorted ids)."""
    out = {f"ids {i}, values {v}": {"ids": i, "values": v}
           for i in ("dictionary", "byte_stream_split", "plain")
           for v in ("dictionary", "byte_stream_split", "plain")}
    if encoding == "compact":
        for v in ("dictionary", "byte_stream_split"):
            out[f"sorted ids delta_binary_packed, values {v}"] = {
                "ids": "delta_binary_packed", "values": v}
    return out


def write_variant(table: pa.Table, path: Path, encoding: str, k: int, ids: str, values: str,
                  level: int) -> None:
    """`table` as kdpipe writes it, but with these encodings on the top-k columns and this
    zstd level; "delta_binary_packed" replaces the id deltas with the sorted ids."""
    id_col, value_col = TOPK_COLUMNS[encoding]
    if ids == "delta_binary_packed":
        deltas = table.column(id_col).combine_chunks()
        flat = np.cumsum(deltas.flatten().to_numpy().astype(np.int64).reshape(-1, k), axis=1)
        sorted_ids = pa.ListArray.from_arrays(deltas.offsets, pa.array(
            flat.reshape(-1).astype(np.uint32), deltas.type.value_type))
        table = table.set_column(table.schema.get_field_index(id_col), SORTED_IDS, sorted_ids)
        id_col = SORTED_IDS
    options = parquet_options(table.column_names)
    options["compression_level"] = level
    top = {parquet_leaf(id_col): ids, parquet_leaf(value_col): values}
    dictionary = [c for c in options["use_dictionary"] if c not in top]
    split = [c for c in options["use_byte_stream_split"] if c not in top]
    encodings = {}
    for leaf, how in top.items():
        if how == "dictionary":
            dictionary.append(leaf)
        elif how == "byte_stream_split":
            split.append(leaf)
        elif how == "delta_binary_packed":
            encodings[leaf] = "DELTA_BINARY_PACKED"
    options.update(use_dictionary=dictionary, use_byte_stream_split=split)
    if encodings:
        options["column_encoding"] = encodings
    pq.write_table(table, path, row_group_size=cols.ROW_GROUP_SIZE, **options)


def partition_kl(lp: np.ndarray, decoded: np.ndarray, tail: np.ndarray) -> dict[str, float]:
    """KL(exact top-k + tail || decoded top-k + the same tail, renormalised as the trainer
    does), nats per position: lp and decoded (n, k) aligned entry by entry, tail (n,)."""
    p = np.concatenate([lp, tail[:, None]], axis=1).astype(np.float64)  # (n, k + 1)
    q = np.concatenate([decoded, tail[:, None]], axis=1).astype(np.float64)
    p -= np.logaddexp.reduce(p, axis=1, keepdims=True)
    q -= np.logaddexp.reduce(q, axis=1, keepdims=True)
    kl = (np.exp(p) * (p - q)).sum(1)
    return {"mean_kl": float(kl.mean()), "p99_kl": float(np.quantile(kl, 0.99)),
            "max_kl": float(kl.max()), "max_abs_logprob_error": float(np.abs(lp - decoded).max())}


def distortion(path: Path, layout: ShardLayout, k: int, positions: Positions
               ) -> dict[str, float]:
    """KL(float32 teacher's top-k + tail || what kdpipe's reader decodes), nats per position."""
    table = pq.read_table(path)
    group = decode_row_group(table, Columns(teacher=True, top_k=k, encoding=layout.encoding,
                                            target_mask=layout.has_target_mask,
                                            segments=layout.has_segments))
    assert group.topk_ids is not None and group.topk_logprobs is not None
    n = group.num_targets
    ids, lp = positions.ids[:n], positions.logprobs[:n].astype(np.float64)
    dec_ids = group.topk_ids.reshape(n, k).astype(np.int64)
    dec_lp = group.topk_logprobs.reshape(n, k).astype(np.float64)
    by_id, dec_by_id = np.argsort(ids, 1), np.argsort(dec_ids, 1)  # align the two orders
    assert np.array_equal(np.take_along_axis(ids, by_id, 1),
                          np.take_along_axis(dec_ids, dec_by_id, 1)), "ids must be exact"
    return partition_kl(np.take_along_axis(lp, by_id, 1), np.take_along_axis(dec_lp, dec_by_id, 1),
                        positions.tail[:n])


COARSER_STEPS = (1 / 8, 1 / 4)  # nats; kdpipe's compact encoding uses LOGPROB_STEP = 1/16


def coarser_step(table: pa.Table, positions: Positions, step: float, path: Path
                 ) -> dict[str, Any]:
    """What the compact encoding would cost and distort with quantisation step `step` (not a
    kdpipe option): its `topk_logprob_q` recomputed, everything else as kdpipe writes it."""
    lp = positions.logprobs.astype(np.float64)
    _, levels = encode_topk(positions.ids, lp * (LOGPROB_STEP / step))  # round(-l / step)
    column = table.column(cols.TOPK_LOGPROB_Q).combine_chunks()
    levels_column = pa.ListArray.from_arrays(column.offsets,
                                             pa.array(levels.reshape(-1), pa.uint16()))
    table = table.set_column(table.schema.get_field_index(cols.TOPK_LOGPROB_Q),
                             cols.TOPK_LOGPROB_Q, levels_column)
    pq.write_table(table, path, row_group_size=cols.ROW_GROUP_SIZE,
                   **parquet_options(table.column_names))
    decoded = -np.rint(-lp / step) * step
    entries = positions.ids.size
    return {"step": step, "bytes_per_entry": path.stat().st_size / entries,
            "distortion": partition_kl(lp, decoded, positions.tail)}


def measure(vocab: int, name: str, teacher: Teacher, args: argparse.Namespace, tmp: Path
            ) -> dict[str, Any]:
    """Both encodings of one synthetic cache: sizes under every variant, distortion."""
    rng = np.random.default_rng(args.seed)
    n = args.sequences * (args.length - 1)
    positions = draw_positions(n, args.k, vocab, teacher, rng)
    seqs, targets = sequences_of(positions, args.length, rng.integers(0, vocab, args.sequences))
    header = {"vocab": vocab, "teacher": name, "params": asdict(teacher)}
    return measure_targets(header, positions, Rows(seqs, targets), args, tmp)


@dataclass
class Rows:
    """What a shard is written from: sequences, their teacher targets, and for a cache read
    back its target masks and packed documents' segments. Plain shards store float16
    log-probs, kdpipe's default."""

    seqs: list[list[int]]
    targets: list[SequenceTargets]
    target_masks: list[np.ndarray] | None = None
    segments: list[list[int]] | None = None

    def layout(self, vocab: int, encoding: str) -> ShardLayout:
        return ShardLayout(id_dtype_for_vocab(vocab), "float16", False, encoding,
                           has_target_mask=self.target_masks is not None,
                           has_segments=self.segments is not None)


def read_cache(root: Path) -> tuple[dict[str, Any], Positions, Rows]:
    """A plain top-k cache's teacher outputs, as `measure_targets` takes them; the float16 or
    float32 log-probs it stores stand for the teacher (`--logprob-dtype float32` caches make
    the distortion of float16 measurable)."""
    cache = open_cache(root)
    m = cache.manifest
    if m.encoding != "plain" or m.cache_mode != "topk":
        raise SystemExit(f"--cache {root}: needs a plain top-k cache (a compact one would be "
                         "measured against its own decoded log-probs)")
    shard_layout = m.shard_layout
    columns = Columns(teacher=True, top_k=m.top_k, target_logprob=True,
                      target_mask=shard_layout.has_target_mask,
                      segments=shard_layout.has_segments)
    seqs, targets, next_ids = [], [], []
    masks: list[np.ndarray] | None = [] if shard_layout.has_target_mask else None
    segments: list[list[int]] | None = [] if shard_layout.has_segments else None
    for table in cache.iter_row_groups(columns.names + list(cols.SEQUENCE_STATS)):
        group = decode_row_group(table, columns)
        assert group.topk_ids is not None and group.topk_logprobs is not None
        assert group.tail_logmass is not None and group.target_logprob is not None
        stats = [table.column(c).to_numpy() for c in cols.SEQUENCE_STATS]
        for row in range(table.num_rows):
            span = group.target_span(row)
            tokens = group.input_ids[group.offsets[row]:group.offsets[row + 1]]
            seqs.append(tokens.tolist())
            where = group.positions_of(row)
            next_ids.append(tokens[1:][where])
            if masks is not None:
                masks.append(where)
            if segments is not None:
                segments.append(group.segments_of(row) or [len(tokens)])
            targets.append(SequenceTargets(
                group.topk_ids.reshape(-1, m.top_k)[span].astype(np.int64),
                group.topk_logprobs.reshape(-1, m.top_k)[span].astype(np.float32),
                group.tail_logmass[span], group.target_logprob[span], None,
                float(stats[0][row]), float(stats[1][row]), float(stats[2][row]),
                float(stats[3][row])))
    ids = np.concatenate([t.topk_ids for t in targets])
    entropy = np.concatenate([np.full(t.tail_logmass.size, t.entropy) for t in targets])
    positions = Positions(ids, np.concatenate([t.topk_logprobs for t in targets]),
                          np.concatenate([t.tail_logmass for t in targets]),
                          np.concatenate(next_ids).astype(np.int64),
                          np.concatenate([t.target_logprob for t in targets]), entropy)
    header = {"vocab": m.vocab_size, "teacher": f"cache {root}", "params": {"zipf": "-"}}
    return header, positions, Rows(seqs, targets, masks, segments)


def order0_bytes(positions: Positions) -> dict[str, float]:
    """Order-0 entropy of the compact encoding's symbols, bytes per entry: the size an ideal
    coder of independent symbols reaches (deltas after each position's first id; levels)."""
    deltas, levels = encode_topk(positions.ids, positions.logprobs)

    def entropy(symbols: np.ndarray) -> float:
        _, counts = np.unique(symbols, return_counts=True)
        p = counts / counts.sum()
        return float(-(p * np.log2(p)).sum() / 8)

    return {"id_deltas": entropy(deltas[:, 1:]), "levels": entropy(levels)}


def measure_targets(header: dict[str, Any], positions: Positions, rows: Rows,
                    args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """Both encodings of these teacher outputs: sizes under every variant, distortion."""
    vocab, k = header["vocab"], positions.ids.shape[1]
    stats = {"mean_top1_prob": float(np.exp(positions.logprobs[:, 0]).mean()),
             "mean_topk_mass": float(-np.expm1(positions.tail).mean()),
             "mean_entropy": float(positions.entropy.mean()),
             "median_id": float(np.median(positions.ids)),
             "ids_above_65535": float((positions.ids > 65535).mean()),
             "order0_bytes_per_entry": order0_bytes(positions)}
    result: dict[str, Any] = {**header, "k": k, "positions": positions.ids.shape[0],
                              "entries": positions.ids.size, "stats": stats, "encodings": {}}
    sample_ids = list(range(len(rows.seqs)))
    for encoding in ("plain", "compact"):
        layout = rows.layout(vocab, encoding)
        path = tmp / f"{encoding}.parquet"
        info = write_shard(path, layout, sample_ids, rows.seqs, rows.targets, rows.target_masks,
                           rows.segments)
        sizes = column_bytes(path)
        entries = info.targets * k
        top = sum(sizes[c] for c in TOPK_COLUMNS[encoding])
        entry: dict[str, Any] = {
            "kdpipe_bytes_per_entry": info.bytes / entries,
            "kdpipe_topk_bytes_per_entry": top / entries,
            "column_bytes_per_entry": {c: b / entries for c, b in sizes.items()},
            "distortion": distortion(path, layout, k, positions), "variants": {},
            "levels": {}}
        table = build_table(layout, sample_ids, rows.seqs, rows.targets, rows.target_masks,
                            rows.segments)
        best, best_bytes = "", float("inf")
        for label, how in variants(encoding).items():
            out = tmp / "variant.parquet"
            write_variant(table, out, encoding, k, how["ids"], how["values"], args.level)
            size = out.stat().st_size
            entry["variants"][label] = {"bytes_per_entry": size / entries, **{
                f"{c}_bytes_per_entry": b / entries for c, b in column_bytes(out).items()
                if c in (*TOPK_COLUMNS[encoding], SORTED_IDS)}}
            if size < best_bytes:
                best, best_bytes = label, size
        entry["best_variant"] = best
        how = variants(encoding)[best]
        for level in args.levels:
            out = tmp / "level.parquet"
            started = time.perf_counter()
            write_variant(table, out, encoding, k, how["ids"], how["values"], level)
            entry["levels"][str(level)] = {"bytes_per_entry": out.stat().st_size / entries,
                                           "write_s": time.perf_counter() - started}
        if encoding == "compact":
            entry["coarser_steps"] = [coarser_step(table, positions, step, tmp / "step.parquet")
                                      for step in COARSER_STEPS]
        result["encodings"][encoding] = entry
    return result


def _coarser(result: dict[str, Any], i: int) -> dict[str, Any]:
    return result["encodings"]["compact"]["coarser_steps"][i]


def _entry(result: dict[str, Any], key: tuple[str, str, Any]) -> dict[str, Any]:
    encoding, table, name = key
    return result["encodings"][encoding][table][name]


def _grid(results: list[dict[str, Any]], title: str, head: str, rows: dict[str, Any],
          cell: Callable[[dict[str, Any], Any], str]) -> list[str]:
    """A titled Markdown table: one row per `rows` item (shown name -> key), one column per
    result, `cell(result, key)` in each."""
    return ["", title, "", f"| {head} | " + " | ".join(_label(r) for r in results) + " |",
            "|---|" + "---|" * len(results)] + [
        f"| {shown} | " + " | ".join(cell(r, key) for r in results) + " |"
        for shown, key in rows.items()]


def report(results: list[dict[str, Any]]) -> list[str]:
    """Markdown tables of `results`."""
    lines = ["| V | teacher | ids Zipf | mean p(top-1) | top-k mass | entropy (nats) | median id | "
             "plain B/entry | compact B/entry | compact top-k columns | compact mean KL "
             "(p99, max) | float16 mean KL |", "|---|" + "---|" * 11]
    for r in results:
        s, plain, comp = r["stats"], r["encodings"]["plain"], r["encodings"]["compact"]
        d = comp["distortion"]
        lines.append(
            f"| {r['vocab']:,} | {r['teacher']} | {r['params']['zipf']} | "
            f"{s['mean_top1_prob']:.2f} | "
            f"{s['mean_topk_mass']:.3f} | {s['mean_entropy']:.2f} | {s['median_id']:,.0f} | "
            f"{plain['kdpipe_bytes_per_entry']:.3f} | **{comp['kdpipe_bytes_per_entry']:.3f}** | "
            f"{comp['kdpipe_topk_bytes_per_entry']:.3f} | {d['mean_kl']:.1e} "
            f"({d['p99_kl']:.1e}, {d['max_kl']:.1e}) | "
            f"{plain['distortion']['mean_kl']:.1e} |")
    lines += _grid(results, "compact with a coarser quantisation step (not a kdpipe option): "
                   "whole-shard bytes per entry; mean KL", "step (nats)",
                   {f"{step:g}": i for i, step in enumerate(COARSER_STEPS)},
                   lambda r, i: f"{_coarser(r, i)['bytes_per_entry']:.3f}; "
                                f"{_coarser(r, i)['distortion']['mean_kl']:.1e}")
    for encoding in ("plain", "compact"):
        first = results[0]["encodings"][encoding]
        lines += _grid(results, f"{encoding}: whole-shard bytes per entry by Parquet encoding "
                       "of the two top-k columns (ids, values)", "variant",
                       {label: (encoding, "variants", label) for label in first["variants"]},
                       lambda r, k: f"{_entry(r, k)['bytes_per_entry']:.3f}")
        lines += _grid(results, f"{encoding}: zstd level, best variant per cache (bytes per "
                       "entry; write seconds)", "level",
                       {level: (encoding, "levels", level) for level in first["levels"]},
                       lambda r, k: f"{_entry(r, k)['bytes_per_entry']:.3f}; "
                                    f"{_entry(r, k)['write_s']:.2f}")
    return lines


def _label(result: dict[str, Any]) -> str:
    if result["teacher"].startswith("cache"):
        return f"{result['teacher']} (V {result['vocab']:,}, k {result['k']})"
    return f"{result['vocab'] // 1000}k {result['teacher']} z{result['params']['zipf']}"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; the results as written to `--out`/results.json."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/bench-vocab-bytes"))
    parser.add_argument("--vocabs", default=",".join(map(str, VOCABS)),
                        help="Synthetic teachers' vocabulary sizes ('' for none).")
    parser.add_argument("--teachers", default=",".join(TEACHERS))
    parser.add_argument("--zipfs", default="1.0,1.4",
                        help="Zipf exponents of the candidate ids: each teacher at each.")
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--cache", type=Path, action="append", default=[],
                        help="Also measure this plain top-k cache's own shards (repeatable); "
                        "its stored log-probs stand for the teacher: make it with "
                        "--logprob-dtype float32 to measure float16's distortion too.")
    parser.add_argument("--sequences", type=int, default=64,
                        help="Sequences per cache: 64 fill one row group.")
    parser.add_argument("--length", type=int, default=512, help="Tokens per sequence.")
    parser.add_argument("--level", type=int, default=cols.SHARD_COMPRESSION_LEVEL,
                        help="zstd level of the encoding variants.")
    parser.add_argument("--levels", default="3,6,9,12,15,19")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.levels = [int(x) for x in args.levels.split(",")]
    logging.basicConfig(level=logging.WARNING)
    args.out.mkdir(parents=True, exist_ok=True)
    results: list[dict[str, Any]] = []

    def done(result: dict[str, Any]) -> None:
        results.append(result)
        print(json.dumps({key: result[key] for key in ("vocab", "teacher", "stats")}),
              flush=True)

    with tempfile.TemporaryDirectory() as tmp_name:
        for vocab in (int(v) for v in args.vocabs.split(",") if v):
            for zipf in (float(z) for z in args.zipfs.split(",")):
                for name in args.teachers.split(","):
                    teacher = replace(TEACHERS[name], zipf=zipf)
                    done(measure(vocab, name, teacher, args, Path(tmp_name)))
        for root in args.cache:
            header, positions, rows = read_cache(root)
            done(measure_targets(header, positions, rows, args, Path(tmp_name)))
    lines = report(results)
    text = "\n".join(lines)
    print(text)
    meta = {"machine": platform.processor() or platform.machine(), "pyarrow": pa.__version__,
            "args": vars(args)}
    everything = {"meta": meta, "results": results}
    (args.out / "results.json").write_text(json.dumps(everything, indent=2, default=str))
    (args.out / "report.md").write_text(text + "\n")
    return everything


if __name__ == "__main__":
    main()
