"""The end-to-end benchmark (autotp.bench): its measurements against what they measure, its
float32 token check against a disagreement, and one real run of the tool on a tiny model."""
from __future__ import annotations

import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM

from autotp import kernels
from autotp.bench import report, runner, shapes, worker
from autotp.launcher import physical_cores
from autotp.runtime import Runtime


def tiny(tie: bool = False) -> torch.nn.Module:
    config = shapes.shape_config("llama-test")
    config.tie_word_embeddings = tie
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("tie", [False, True])
def test_streamed_bytes_leave_out_the_lookup_table_unless_it_is_the_output_projection(tie):
    model = tiny(tie)
    # parameters() lists a tied table once; buffers are the rotary frequencies
    everything = sum(t.numel() * 4 for t in [*model.parameters(), *model.buffers()] if t.is_floating_point())
    table = model.get_input_embeddings().weight.numel() * 4
    assert worker.streamed_bytes(model) == (everything if tie else everything - table)


def test_step_clock_times_every_step_and_leaves_the_tokens_alone():
    """generate_once's tokens are plain greedy / beam search's, all 7 of them even where the
    model's end-of-sequence token comes first (here made the first token greedy picks: plain
    generate stops there, the negative control)."""
    model = tiny()
    ids = worker.case_ids(512, 1, 9)
    for beams in (1, 3):
        first, steps, tokens = worker.generate_once(model, ids, beams, 7, world=1)
        plain = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                               num_beams=beams, max_new_tokens=7, min_new_tokens=7, pad_token_id=0)
        assert tokens == plain[:, 9:].tolist()
        assert len(tokens[0]) == 7 and len(steps) == 6  # first token, then 6 later steps
        assert first > 0 and all(s > 0 for s in steps)
    model.generation_config.eos_token_id = tokens[0][0]
    stops = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=7,
                           pad_token_id=0)
    assert stops.shape[1] == 10
    first, steps, tokens = worker.generate_once(model, ids, 1, 7, world=1)
    assert len(tokens[0]) == 7 and len(steps) == 6


def test_fusion_matters_only_where_attention_and_mlp_run_in_parallel():
    assert shapes.fusion_matters(shapes.shape_config("gptj-test"), 2)
    assert not shapes.fusion_matters(shapes.shape_config("llama-test"), 2)


def test_the_bandwidth_probe_reads_several_times_the_largest_cache(tmp_path):
    """The probe's size from a sysfs cache tree: 512 MB where the caches are small, 4 x the
    largest where it is large (a 480 MiB L3 reported by a Xeon guest), never over 4 GiB; no
    tree, no bound."""
    def tree(*sizes):
        root = tmp_path / "-".join(sizes)
        for i, size in enumerate(sizes):
            (root / f"index{i}").mkdir(parents=True)
            (root / f"index{i}" / "size").write_text(size + "\n")
        return root

    small = worker.last_level_cache_bytes(tree("32K", "512K", "32768K"))
    assert small == 32 << 20
    assert worker.probe_bytes(small) == 512 << 20
    large = worker.last_level_cache_bytes(tree("48K", "2048K", "491520K"))
    assert large == 480 << 20
    assert worker.probe_bytes(large) == 4 * (480 << 20)  # negative control: not the fixed 512 MB
    assert worker.last_level_cache_bytes(tree("1M", "2G")) == 2 << 30
    assert worker.probe_bytes(2 << 30) == 4 << 30  # capped: not 8 GiB per rank
    assert worker.last_level_cache_bytes(tmp_path / "absent") == 0
    assert worker.last_level_cache_bytes(tree("?", "")) == 0
    assert worker.probe_bytes() >= max(512 << 20, 4 * worker.last_level_cache_bytes())


def test_token_verdict_finds_the_first_disagreement():
    ref = [{"beams": 1, "input": 8, "tokens": [[5, 6, 7, 8]]}, {"beams": 4, "input": 8, "tokens": [[1, 2, 3]]}]
    same = json.loads(json.dumps(ref))
    assert report.token_verdict(ref, same) == "identical"
    same[1]["tokens"][0][2] = 9  # negative control: one token changed
    assert report.token_verdict(ref, same) == "differ: beam 4, in 8, sequence 0, step 2"


def test_x_floor_sets_each_run_against_the_floor_sampled_before_it():
    """Two runs, the second slower because memory was slower then (its floor too): the paired
    ratio is the median of 30/25 and 45/40; the old reading (median latency over median floor)
    would give 37.5/32.5 (negative control)."""
    def result(floor_s):
        case = {"beams": 1, "input": 32, "first": [0.1, 0.1], "next": [0.030, 0.045], "floors": [0.025, 0.040]}
        return {"cases": [case], "floor_s": floor_s, "collectives_per_token": 2, "backend": "shm",
                "packed_layers": 1, "bytes_per_rank": 1, "compiled": True}

    row, = report.latency_rows("m", {"cfg": [result(0.0325)]}, {"cfg": "cfg"})
    assert row["next_over_floor"] == pytest.approx((30 / 25 + 45 / 40) / 2)
    assert row["floor_ms"] == pytest.approx(32.5)
    assert row["next_over_floor"] != pytest.approx(37.5 / 32.5)
    legacy = result(0.0325)  # results written before runs carried their floors
    del legacy["cases"][0]["floors"]
    row, = report.latency_rows("m", {"cfg": [legacy]}, {"cfg": "cfg"})
    assert row["next_over_floor"] == pytest.approx(37.5 / 32.5)


def test_the_chart_plots_x_floor_where_no_1_rank_configuration_ran(tmp_path):
    """Speedups need a 1-rank configuration; a run of 2-rank configurations only charts next token
    over the floor instead (it drew empty axes before), and a run with neither draws nothing."""
    pytest.importorskip("matplotlib", reason="the chart needs matplotlib (pip install -e '.[bench]')")
    row = {"model": "m", "case": "greedy 32", "label": "2 ranks", "next_over_floor": 1.2, "speedup_next": None}
    doc = {"machine": {"cpu": "cpu"}, "settings": {"dtype": "bfloat16"}, "models": {"m": {}}, "latency": [row]}
    assert report.chart_panels(doc) == [("next_over_floor", "next token time / bandwidth floor")]
    assert report.chart(doc, tmp_path / "floor.png") is None and (tmp_path / "floor.png").stat().st_size > 0
    with_speedups = {**doc, "latency": [{**row, "speedup_next": 1.8, "speedup_first": 1.9}]}
    assert [m for m, _ in report.chart_panels(with_speedups)] == ["speedup_next", "speedup_first"]
    bare = {**doc, "latency": [{**row, "next_over_floor": None}]}
    assert report.chart_panels(bare) == []
    assert "no row has" in report.chart(bare, tmp_path / "bare.png") and not (tmp_path / "bare.png").exists()


def test_bad_arguments_are_refused_with_the_fix(tmp_path, capsys):
    cores = len(physical_cores(os.sched_getaffinity(0)))
    with pytest.raises(SystemExit, match="--ranks 9 needs 2 to"):
        runner.main(["--ranks", "9", "--work-dir", str(tmp_path)])
    with pytest.raises(SystemExit, match="neither a named shape"):
        runner.main(["--model", str(tmp_path / "missing"), "--ranks", str(min(2, cores)),
                     "--work-dir", str(tmp_path)])


@pytest.mark.skipif(len(physical_cores(os.sched_getaffinity(0))) < 2, reason="2 ranks need 2 physical cores")
@pytest.mark.parametrize("isa", ["auto", "generic"])
def test_a_run_on_a_tiny_model_reports_every_number(tmp_path, isa):
    """On this CPU's best instruction set, and as on a CPU without AVX-512 (isa="generic": the
    portable read probe and all-reduce sums, torch GEMMs): every configuration runs and reports.
    The compiled decoding step on the best ISA; the eager one on the generic run (compiling
    twice would add a minute to the suite and test nothing new here). Beam search on the best
    ISA, greedy on the generic run: each compiled shape costs the suite half a minute on two
    cores (the compiled greedy step is test_decode's), and the report's rows are the same code."""
    runtime = Runtime(isa=isa)
    bf16, int8 = ("native-shm", "int8-shm") if isa == "auto" else ("native-shm-eager", "int8-shm-eager")
    beams = 2 if isa == "auto" else 1
    native = kernels.status(runtime)[0]
    out = tmp_path / "res" / "bench"
    runner.main(["--model", "llama-test", "--configs", "transformers", bf16, int8,
                 "--input", "8", "--beams", str(beams), "--new-tokens", "5", "--runs", "1", "--rounds", "1",
                 "--work-dir", str(tmp_path / "work"), "--out", str(out)], runtime=runtime)
    doc = json.loads(out.with_suffix(".json").read_text())
    assert out.with_suffix(".png").stat().st_size > 10_000 and out.with_suffix(".md").is_file()
    rows = {(r["config"], r["beams"]): r for r in doc["latency"]}
    assert set(rows) == {(c, beams) for c in ("transformers", bf16, int8)}
    shape = shapes.shape_config("llama-test")
    layers = shape.num_hidden_layers
    # keys and values of every layer, bf16, over prompt + half the new tokens, per rank
    per_position = layers * 2 * shape.num_key_value_heads * (shape.hidden_size // shape.num_attention_heads) * 2
    results = [json.loads(p.read_text()) for p in (tmp_path / "work" / "raw").glob("*.json")
               if not p.name.endswith(".spec.json")]
    assert results and all(len(c["floors"]) == 1 for r in results for c in r["cases"])  # each run's own floor
    for (config, _), row in rows.items():
        base = rows[("transformers", beams)]
        assert row["speedup_next"] == pytest.approx(base["next"]["median_ms"] / row["next"]["median_ms"])
        assert row["floor_ms"] > 0 and row["next_over_floor"] == pytest.approx(
            row["next"]["median_ms"] / row["floor_ms"])  # one run: its own floor

        ranks = 1 if config == "transformers" else 2
        assert row["cache_mb"] == pytest.approx(per_position // ranks * beams * (8 + 5 // 2) / 1e6)
        assert row["next_over_floor_with_cache"] == pytest.approx(
            row["next_over_floor"] / (1 + row["cache_mb"] * 1e6 / row["bytes_per_rank"]))
        assert row["next_over_floor_with_cache"] < row["next_over_floor"]
        if config == "transformers":
            assert row["collectives_per_token"] == 0 and row["packed_layers"] == 0
        else:  # attention and MLP reduce once each per layer; the vocabulary-parallel embedding
            # reduces, the vocabulary-parallel head gathers
            assert row["collectives_per_token"] == 2 * layers + 2
            assert row["backend"] == "shm"
            assert row["packed_layers"] == (7 * layers + 1 if native else 0)  # torch GEMMs without AVX-512
            assert row["bytes_per_rank"] < base["bytes_per_rank"] * 0.6
        assert row["int8_layers"] == (7 * layers if config == int8 else 0)
        if config == int8:  # the decoder's Linear layers in INT8, compared with their bf16 twin
            twin = rows[(bf16, beams)]
            assert row["bf16_over_int8_next"] == pytest.approx(twin["next"]["median_ms"] / row["next"]["median_ms"])
            assert row["bytes_per_rank"] < twin["bytes_per_rank"]
    accuracy = {a["config"]: a for a in doc["accuracy"]}
    assert "fp32_tokens" not in accuracy[int8]  # INT8 weights are not the float32 model's
    assert all(a["fp32_tokens"] == "identical" for k, a in accuracy.items() if k != int8)
    assert not doc["token_mismatches"]
    own = accuracy["transformers"]["logits_err"]
    assert 0 < own == accuracy["transformers"]["baseline_err"]
    assert accuracy[bf16]["logits_err"] <= 2 * own  # bf16 sharded: at most twice the unsharded error


@pytest.mark.parametrize("beams, compiled", [(1, False), (3, False), (1, True)])
def test_the_decode_profile_accounts_for_the_whole_step(beams, compiled):
    """tools/profile_decode.py on a tiny model, autotp on one rank: every category printed, the
    shares add up to the whole step (the rest is what no op claims), and the GEMMs are seen
    (the native or torch linear ops; in a compiled step the C functions it calls them by,
    autotp.kernels.shims); with beams, beam search's work and the cache's reorder too."""
    import subprocess
    import sys
    from pathlib import Path

    tool = Path(__file__).resolve().parents[1] / "tools" / "profile_decode.py"
    done = subprocess.run([sys.executable, str(tool), "--model", "llama-test", "--steps", "2", "--timed", "2",
                           "--beams", str(beams), *(["--compile"] if compiled else [])],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    profiled, _, clocked = done.stdout.partition("unprofiled, by autotp's op clock")
    rows = {}
    for line in profiled.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[-2].endswith("%"):
            rows[" ".join(parts[:-2])] = float(parts[-2].rstrip("%"))
    assert set(rows) == {"GEMMs", "attention", "norms / rotary / elementwise", "all-reduce", "KV cache", "lm_head",
                         "beam search", "rest"}, done.stdout
    assert sum(rows.values()) == pytest.approx(100.0, abs=0.5) and rows["GEMMs"] > 0 and rows["attention"] > 0
    assert (rows["beam search"] > 0) == (beams > 1), done.stdout
    assert f"beam {beams}" in done.stdout if beams > 1 else "greedy" in done.stdout
    if not kernels.extension_loaded():
        assert not clocked, done.stdout  # the op clock is the extension's
        return
    shares, calls = {}, {}
    for line in clocked.splitlines():
        name, sep, rest = line.partition("%")
        fields = rest.split()  # ms / step, then the calls (none for "outside")
        if sep and fields:
            label, share = name.rsplit(maxsplit=1)
            shares[label] = float(share)
            calls[label] = int(fields[1]) if len(fields) > 1 else None
    assert set(shares) == {"GEMMs (lm_head included)", "all-reduce / all-gather (waits included)",
                           "attention (decode_attention)", "outside autotp's ops"}, done.stdout
    assert sum(shares.values()) == pytest.approx(100.0, abs=0.5), done.stdout
    assert calls["all-reduce / all-gather (waits included)"] == 0, done.stdout  # one rank: no collective
    if kernels.status()[0]:  # the native GEMMs and attention run (not where auto leaves them to torch)
        # llama-test, 2 layers: per step q/k/v merged, o, gate/up merged and down per layer (8
        # calls, and the lm_head's where it is packed), and one attention call a layer
        assert calls["attention (decode_attention)"] == 2, done.stdout
        assert calls["GEMMs (lm_head included)"] in (8, 9) and shares["GEMMs (lm_head included)"] > 0, done.stdout


def run_native_tool(name: str, *args: str):
    """tools/<name> run with ``args`` on one thread (skipped, with the reason, where the native
    kernels are not built); its finished process, which must have succeeded."""
    import subprocess
    import sys
    from pathlib import Path

    if not kernels.extension_loaded():
        pytest.skip(f"native kernels unavailable: {kernels.status()[1]}")
    tool = Path(__file__).resolve().parents[1] / "tools" / name
    done = subprocess.run([sys.executable, str(tool), *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    return done


def test_the_prefetch_tool_times_every_kind_both_ways():
    """tools/bench_prefetch.py on a tiny model, one rank: a row per weight kind and row count,
    with the time off and at each distance asked, each distance's ratio, and the defaults it
    found named."""
    from autotp import kernels

    done = run_native_tool("bench_prefetch.py", "--model", "llama-test", "--kinds", "bf16", "int8", "int4",
                           "--rows", "1", "3", "--rounds", "2", "--ahead", "4", "16")
    rows = [line.split() for line in done.stdout.splitlines() if line.split()[:1] in (["bf16"], ["int8"], ["int4"])]
    assert sorted((r[0], r[1]) for r in rows) == sorted((k, m) for k in ("bf16", "int8", "int4") for m in ("1", "3"))
    for r in rows:
        assert len(r) == 6 + 2 * 3, r
        off, on4, ratio4, on16, ratio16 = float(r[4]), float(r[6]), float(r[8]), float(r[9]), float(r[11])
        assert min(off, on4, ratio4, on16, ratio16) > 0, r
    default = "on" if kernels.weight_prefetch() else "off"
    assert f"default prefetch here: {default}, {kernels.weight_prefetch_pairs()} pairs ahead" in done.stdout
    assert "on 4 ms" in done.stdout and "on 16 ms" in done.stdout


def test_the_tables_tool_times_two_tables_beside_the_probes():
    """tools/bench_tables.py on a tiny model, one rank: the best table this CPU runs against the
    generic one, a row per weight kind and row count with both times, both probes and the
    ratios; a table this CPU does not run is refused by name."""
    import subprocess
    import sys
    from pathlib import Path

    from autotp import kernels

    best = kernels.isa()
    done = run_native_tool("bench_tables.py", "--model", "llama-test", "--kinds", "bf16", "int8",
                           "--isas", best, "generic", "--rows", "1", "17", "--rounds", "2")
    assert f"A = {best}, B = generic" in done.stdout
    rows = [line.split() for line in done.stdout.splitlines() if line.split()[:1] in (["bf16"], ["int8"])]
    assert sorted((r[0], r[1]) for r in rows) == sorted((k, m) for k in ("bf16", "int8") for m in ("1", "17"))
    for r in rows:
        a_ms, b_ms, probe_ms, arena_ms, b_over_a = (float(r[i]) for i in (5, 6, 7, 8, 11))
        assert a_ms > 0 and b_ms > 0 and probe_ms > 0 and arena_ms > 0, r
        assert b_over_a > 0, r
    tool = Path(__file__).resolve().parents[1] / "tools" / "bench_tables.py"
    refused = subprocess.run([sys.executable, str(tool), "--model", "llama-test", "--isas", "no_such_isa", "generic"],
                             capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0 and "does not run the no_such_isa kernels" in refused.stderr


def test_the_int8_activations_tool_times_both_widths():
    """tools/bench_int8_activations.py on a tiny model, one rank: a row per row count with both
    times, their ratio and the outputs' difference, which is nonzero (the switch reached the
    kernels) and within what 8-bit rounding of the activations allows."""
    done = run_native_tool("bench_int8_activations.py", "--model", "llama-test", "--rows", "1", "3", "--rounds", "2")
    rows = [line.split() for line in done.stdout.splitlines() if line.split()[:1] in (["1"], ["3"])]
    assert sorted(r[0] for r in rows) == ["1", "3"], done.stdout
    for r in rows:
        int16_ms, int8_ms, ratio, diff = float(r[3]), float(r[5]), float(r[7]), float(r[8])
        assert int16_ms > 0 and int8_ms > 0 and ratio > 0, r
        assert 0 < diff < 0.05, r


def test_the_attention_tool_times_each_path_on_both_kinds_of_pages():
    """tools/bench_attention.py on the tiny llama shape: a row per (path, pages) with the cache's
    bytes of the shape asked for (2 layers x keys and values x 3 rows x 1 KV head of 2 x 40
    positions x head dim 32 x 2 bytes), a time and a rate; the probe's line after them."""
    from autotp import kernels

    done = run_native_tool("bench_attention.py", "--model", "llama-test", "--beams", "3", "--length", "40",
                           "--isa", "auto", "generic", "--rounds", "2")
    rows = [line.split() for line in done.stdout.splitlines() if line.startswith("llama-test ") and "probe" not in line]
    assert {(r[1], r[2]) for r in rows} >= {(kernels.isa(), "4k"), ("generic", "4k")}, done.stdout
    mb = 2 * 2 * 3 * 1 * 40 * 32 * 2 / 1e6
    for r in rows:
        assert float(r[3]) == round(mb, 2), r
        ms, rate = float(r[4]), float(r[5])
        assert ms > 0 and rate > 0, r
        # the rate is the bytes over the time (each printed to 3 significant digits), however slow the pass
        assert abs(rate * ms - mb) < 0.02 * mb, r
    assert "read probe" in done.stdout


def test_the_siblings_tool_times_both_ways_and_compares_tokens():
    """tools/bench_siblings.py on a tiny model, one rank, eager: both models' next- and first-token
    medians, the ratios, the groups merged and the same tokens either way."""
    done = run_native_tool("bench_siblings.py", "--model", "llama-test", "--eager", "--quantize", "int8",
                           "--rounds", "2", "--new-tokens", "4")
    lines = done.stdout.splitlines()
    assert "groups merged" in lines[0] and int(lines[0].split(";")[-1].split()[0]) > 0, lines[0]
    rows = {line.split()[0]: [float(v) for v in line.split()[1:]] for line in lines
            if line.split()[:1] in (["alone"], ["merged"]) and "/" not in line}
    assert set(rows) == {"alone", "merged"} and all(v > 0 for r in rows.values() for v in r), rows
    ratio = next(line for line in lines if line.startswith("merged / alone"))
    assert float(ratio.split("next ")[1].split(",")[0]) > 0 and float(ratio.split("first ")[1]) > 0, ratio
    assert "same tokens: True" in done.stdout
