"""Multi-rank: from_pretrained on pre-sharded directories (written by create_shard_model) and
on the original Hugging Face directories, against the unsharded model (float32, 1e-4)."""
import shutil

import pytest

import autotp
import rank_checks
import zoo
from autotp.cli import create_shard_model
from autotp.plan import CheckpointError
from dist_helper import run_ranks

TOL = 1e-4
# GPT-2: Conv1D weights stored [in, out]; Phi-3: fused q|k|v and gate|up; Mixtral: experts stored one
# tensor per expert (w1, w2, w3) that transformers merges into 3-D parameters
FAMILIES = ["llama", "gptj", "bloom", "gpt2", "phi3", "mixtral"]


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Each family saved with save_pretrained as one file and as several files."""
    root = tmp_path_factory.mktemp("sources")
    dirs = {}
    for family in FAMILIES:
        model = zoo.build(family)
        model.save_pretrained(root / f"{family}-one")
        model.save_pretrained(root / f"{family}-many", max_shard_size="100KB")
        assert len(list((root / f"{family}-many").glob("*.safetensors"))) > 1
        dirs[family] = [root / f"{family}-one", root / f"{family}-many"]
    return dirs


@pytest.mark.parametrize("world_size,layout", [(2, "one file"), (3, "several files")])
def test_presharded_and_hf_directories_match_unsharded(sources, tmp_path, world_size, layout):
    cases = []
    for family, hf_dirs in sources.items():
        for hf in hf_dirs[:1] if layout == "one file" else hf_dirs[1:]:
            out = tmp_path / f"{hf.name}-tp{world_size}"
            assert create_shard_model(["-m", str(hf), "--world-size", str(world_size), "--save-path", str(out),
                                       "--quiet"]) == 0
            cases += [(family, str(out)), (family, str(hf))]
    for per_rank in run_ranks(rank_checks.load_and_compare, world_size, cases):
        for r in per_rank:
            assert r["max_abs_diff"] <= TOL, r
            assert r["tokens_equal"] and r["new_tokens"] == rank_checks.NEW_TOKENS, r


def test_expert_parallel_checkpoints(sources, tmp_path):
    """Mixtral split by whole experts: written by create_shard_model --experts expert, and read
    from the Hugging Face directory (each rank reads its experts' stored tensors only)."""
    hf = sources["mixtral"][0]
    out = tmp_path / "ep2"
    assert create_shard_model(["-m", str(hf), "--world-size", "2", "--save-path", str(out), "--experts", "expert",
                               "--quiet"]) == 0
    cases = [("mixtral", str(out)), ("mixtral", str(hf), {"experts": "expert"})]
    for per_rank in run_ranks(rank_checks.load_and_compare, 2, cases):
        for r in per_rank:
            assert r["max_abs_diff"] <= TOL and r["tokens_equal"], r
    with pytest.raises(CheckpointError, match="written with experts='expert'"):
        autotp.from_pretrained(out, world_size=2, experts="tensor")


def test_a_rank_reads_only_its_own_file(sources, tmp_path):
    out = tmp_path / "tp2"
    assert create_shard_model(["-m", str(sources["llama"][0]), "--world-size", "2", "--save-path", str(out),
                               "--quiet"]) == 0
    per_rank = []
    for rank in range(2):  # a copy per rank holding its own rank file only: the other is gone
        mine = tmp_path / f"rank{rank}"
        shutil.copytree(out, mine)
        (mine / f"rank-{1 - rank:02d}-of-02.safetensors").unlink()
        per_rank.append(str(mine))
    diffs = run_ranks(rank_checks.load_own_file_only, 2, "llama", per_rank)
    assert max(diffs) <= TOL
