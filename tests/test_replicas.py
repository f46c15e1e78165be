"""Replicas: R seeds of one configuration trained together in one process (infer.fit_replicas, replicas=R).

Each replica is its single run (same init, noise, schedule; the same trajectory up to the rounding of the batched
matmuls); it does not depend on how many replicas share the process or which; a guide that cannot take the replica
dim is refused in one line; from the command line each replica writes a single run's outputs into its own dir."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

from conftest import but, run_cli
from guides import FlowGuide, GaussianGuide, MeanFieldGuide, MixtureGuide, StructuredGuide
from infer import ClosedFormELBO, fit
from infer.fit_replicas import fit_replicas, stack_size
from infer.replicas import stack, unstack
from models import DLGM, VAE, OneBit

PAIRS = {
    "vae+gaussian": (lambda n: VAE(n, hidden=16, gain=True), GaussianGuide),
    "dlgm+structured": (lambda n: DLGM(n, hidden=16, prior_hidden=16, prior_gain=True), StructuredGuide),
    "dlgm+meanfield": (lambda n: DLGM(n, hidden=16, prior_hidden=16), MeanFieldGuide),
    "vae+flow": (lambda n: VAE(n, hidden=16), FlowGuide),
}


def build(name, n):
    make_model, make_guide = PAIRS[name]
    model = make_model(n)
    return model, make_guide(model)


def losses(result):
    return np.array([row["loss"] for row in result.history])


def train_group(name, seeds, n=5, steps=60, **kw):
    pairs = [build(name, n) for _ in seeds]
    kw.setdefault("elbo", ClosedFormELBO(num_particles=16, noise="lattice"))
    return fit_replicas([p[0] for p in pairs], [p[1] for p in pairs], OneBit(n), list(seeds), steps=steps,
                        log_every=10, **kw), pairs


def train_single(name, seed, n=5, steps=60, **kw):
    model, guide = build(name, n)
    kw.setdefault("elbo", ClosedFormELBO(num_particles=16, noise="lattice"))
    return fit(model, guide, OneBit(n), seed=seed, steps=steps, log_every=10, **kw), (model, guide)


@pytest.mark.parametrize("name", list(PAIRS))
def test_each_replica_trains_as_the_single_run_of_its_seed(name):
    group, _ = train_group(name, [0, 1, 2])
    for seed, result in zip([0, 1, 2], group):
        single, _ = train_single(name, seed)
        np.testing.assert_allclose(losses(result), losses(single), rtol=1e-4, atol=1e-5)


def test_a_replica_does_not_depend_on_its_neighbours():
    alone, _ = train_group("vae+gaussian", [7])
    crowded, _ = train_group("vae+gaussian", [3, 9, 7, 11])
    np.testing.assert_allclose(losses(crowded[2]), losses(alone[0]), rtol=1e-4, atol=1e-5)


def test_replicas_train_on_the_traced_plan_like_single_runs():
    group, _ = train_group("dlgm+structured", [0, 1], steps=220)
    single, _ = train_single("dlgm+structured", 1, steps=220)
    assert group[1].engine.startswith("graph") and single.engine == "graph"
    np.testing.assert_allclose(losses(group[1]), losses(single), rtol=1e-3, atol=1e-4)


def test_the_trained_parameters_land_in_each_replicas_own_model_and_guide():
    group, pairs = train_group("vae+gaussian", [0, 1], steps=30)
    single, (model, guide) = train_single("vae+gaussian", 1, steps=30)
    for mine, theirs in ((pairs[1][0], model), (pairs[1][1], guide)):
        for (name, a), (_, b) in zip(mine.named_parameters(), theirs.named_parameters()):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    assert not torch.equal(pairs[0][0].decoder[1].weight, pairs[1][0].decoder[1].weight)


def test_changing_the_number_of_replicas_leaves_the_distribution_of_a_replicas_result_unchanged():
    """40 seeds trained one per process-call and 40 other seeds trained as one group of 40: the final training
    losses come from the same distribution (two-sample Kolmogorov-Smirnov), and the group's replicas are not
    copies of one another (shared noise or a shared seed would make them collapse)."""
    singles = [losses(train_single("vae+gaussian", seed, steps=20)[0])[-1] for seed in range(100, 140)]
    group, _ = train_group("vae+gaussian", range(200, 240), steps=20)
    grouped = [losses(r)[-1] for r in group]
    assert stats.ks_2samp(singles, grouped).pvalue > 0.01
    assert len(set(np.round(grouped, 6))) == len(grouped)


def test_stack_and_unstack_round_trip_every_replicas_parameters():
    torch.manual_seed(0)
    copies = [build("dlgm+structured", 4)[1] for _ in range(3)]
    stacked = stack(copies)
    fresh = [build("dlgm+structured", 4)[1] for _ in range(3)]
    unstack(stacked, fresh)
    for a, b in zip(copies, fresh):
        for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
            assert torch.equal(p, q), name


def test_a_guide_that_cannot_take_a_replica_dimension_is_refused_in_one_line():
    model = VAE(5)
    guides = [MixtureGuide(model), MixtureGuide(model)]
    with pytest.raises(ValueError, match="cannot take a replica dimension") as err:
        fit_replicas([model, VAE(5)], guides, OneBit(5), [0, 1], steps=5)
    assert "\n" not in str(err.value)


def test_replicas_refuse_plain_monte_carlo_noise_and_other_objectives():
    pairs = [build("vae+gaussian", 5) for _ in range(2)]
    with pytest.raises(ValueError, match="noise='mc' is not allowed with replicas"):
        fit_replicas([p[0] for p in pairs], [p[1] for p in pairs], OneBit(5), [0, 1], steps=5,
                     elbo=ClosedFormELBO(num_particles=8, noise="mc"))
    with pytest.raises(ValueError, match="distinct seeds"):
        fit_replicas([p[0] for p in pairs], [p[1] for p in pairs], OneBit(5), [3, 3], steps=5)


def test_a_stack_holds_as_many_replicas_as_keep_its_logits_small():
    assert stack_size(3, 32, OneBit(1000)) == 3
    assert stack_size(3, 128, OneBit(1000)) == 3
    assert stack_size(5, 128, OneBit(1000)) == 4
    assert stack_size(3, 128, OneBit(10000)) == 1
    assert stack_size(16, 128, OneBit(5)) == 16


def test_a_replicas_checkpoint_resumes_as_its_single_run(tmp_path):
    kw = dict(elbo=ClosedFormELBO(num_particles=16, noise="lattice"))
    pairs = [build("vae+gaussian", 5) for _ in range(2)]
    fit_replicas([p[0] for p in pairs], [p[1] for p in pairs], OneBit(5), [0, 1], steps=30, log_every=10,
                 checkpoint_paths=[tmp_path / "a.pt", tmp_path / "b.pt"], **kw)
    _, (model, guide) = train_single("vae+gaussian", 1, steps=30, checkpoint_path=tmp_path / "single.pt",
                                     checkpoint_every=30)
    from infer.checkpoint import load_checkpoint

    ours, theirs = load_checkpoint(tmp_path / "b.pt"), load_checkpoint(tmp_path / "single.pt")
    assert sorted(ours["params"]) == sorted(theirs["params"])
    assert torch.equal(ours["rng"]["torch"], theirs["rng"]["torch"])
    resumed = [fit(*build("vae+gaussian", 5), OneBit(5), seed=1, steps=40, log_every=10, resume=state, **kw)
               for state in (ours, theirs)]
    np.testing.assert_allclose(losses(resumed[0]), losses(resumed[1]), rtol=1e-4, atol=1e-5)


FAST = ["train.steps=30", "train.num_particles=8", "eval.samples=10000", "eval.replicates=4", "data.n=3",
        "optim.lr=0.02", "eval.figures=false"]


def test_each_replica_of_a_command_line_run_writes_a_single_runs_outputs_into_its_own_dir(tmp_path):
    proc = run_cli(*FAST, "replicas=2", "seed=4", "hydra.run.dir=out", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "out"
    assert json.loads((out / "status.json").read_text())["replicas"] == ["seed4", "seed5"]
    single = run_cli(*FAST, "seed=5", "hydra.run.dir=single", cwd=tmp_path)
    assert single.returncode == 0, single.stderr
    for name in ("metrics.json", "history.csv", "checkpoint.pt", "encodings.nc", ".hydra/config.yaml"):
        assert (out / "seed5" / name).exists(), name
    ours = json.loads((out / "seed5" / "metrics.json").read_text())
    theirs = json.loads((tmp_path / "single" / "metrics.json").read_text())
    assert ours["seed"] == 5 and ours["replicas"] == 2
    assert ours["loss"] == pytest.approx(theirs["loss"], rel=1e-4)


def test_a_sweep_of_replicas_counts_each_replica_as_a_seed(tmp_path):
    proc = run_cli("-m", *but(FAST, "data.n"), "replicas=3", "data.n=2,3", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    summary = next(tmp_path.rglob("summary.csv"))
    import pandas as pd

    jobs = pd.read_csv(summary)
    assert len(jobs) == 6 and sorted(jobs["seed"]) == [0, 0, 1, 1, 2, 2] and set(jobs["status"]) == {"ok"}


def test_python_replicas_written_by_write_run_are_seeds_of_the_command_lines_replicas_configuration(tmp_path):
    """fit_replicas, then evaluate and write_run for each replica, records each as `python run.py replicas=R` records
    its replicas (replicas=R in the head and among the overrides), so a summary counts them as seeds of one
    configuration with the command line's replicas, not with the single runs (whose last digits differ)."""

    from analysis.report import evaluate, write_run
    from analysis.sweep import summarize

    proc = run_cli(*FAST, "replicas=2", "seed=4", "hydra.run.dir=runs/cli", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    data = OneBit(3)
    models = [VAE(3) for _ in range(2)]
    guides = [GaussianGuide(m) for m in models]
    results = fit_replicas(models, guides, data, [4, 5], steps=30, lr=0.02,
                           elbo=ClosedFormELBO(num_particles=8, noise="lattice"))
    for model, guide, result, seed in zip(models, guides, results, [4, 5]):
        metrics, grids = evaluate(model, guide, data, samples=10000, replicates=4, seed=seed, result=result)
        write_run(tmp_path / "runs" / f"python{seed}", model, guide, data, result, metrics, grids, figures=False)
    ours = json.loads((tmp_path / "runs" / "python5" / "metrics.json").read_text())
    theirs = json.loads((tmp_path / "runs" / "cli" / "seed5" / "metrics.json").read_text())
    assert ours["replicas"] == theirs["replicas"] == 2 and ours["arguments"]["replicas"] == 2
    assert ours["engine"] == theirs["engine"] and ours["loss"] == theirs["loss"]  # the same stack, bit for bit
    found = summarize(tmp_path / "runs", figures=False)
    configs = found["aggregated"]
    assert len(configs) == 1 and list(configs["seeds"]) == [2], configs.to_string()
    assert set(found["jobs"]["override:replicas"].astype(str)) == {"2"}  # in every run, so no column of the configurations
    assert sorted(found["duplicates"]) == ["cli/seed4", "cli/seed5"] or sorted(found["duplicates"]) == [
        "python4", "python5"]


def test_replicas_with_a_resume_are_refused_in_one_line(tmp_path):
    proc = run_cli(*FAST, "replicas=2", "train.resume=x.pt", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error: train.resume is not allowed with")


def test_a_replica_that_diverges_ends_with_its_own_divergence_error():
    from infer import DivergenceError

    group, _ = train_group("vae+gaussian", [0, 1], steps=40, lr=1e30)
    assert all(isinstance(r, DivergenceError) for r in group)
    assert all(r.step is not None and r.step <= 40 and "diverged at step" in str(r) for r in group)


def test_a_last_stack_of_one_is_its_single_run_exactly(monkeypatch):
    import infer.fit_replicas as module

    monkeypatch.setattr(module, "STACK_FLOATS", 2 * 16 * 2 * 5)  # two replicas per stack: stacks [3, 4], [5]
    group, _ = train_group("dlgm+structured", [3, 4, 5], steps=30)
    single, _ = train_single("dlgm+structured", 5, steps=30)
    assert losses(group[2]).tolist() == losses(single).tolist()
    assert [r.recipe["replicas"] for r in group] == [3, 3, 3]


def test_replicas_too_large_to_stack_are_their_single_runs_exactly(monkeypatch, tmp_path):
    import infer.fit_replicas as module

    monkeypatch.setattr(module, "STACK_FLOATS", 1)  # every stack of one: the dlgm at n = 1000 with 128 particles
    paths = [tmp_path / "a.pt", tmp_path / "b.pt"]
    group, _ = train_group("dlgm+structured", [3, 4], steps=30, checkpoint_paths=paths)
    single, _ = train_single("dlgm+structured", 4, steps=30)
    assert losses(group[1]).tolist() == losses(single).tolist()
    assert all(p.exists() for p in paths) and group[1].recipe["replicas"] == 2


def test_the_command_lines_unstackable_guides_are_the_conf_guides_fit_replicas_refuses():
    """cli.values.UNSTACKABLE_GUIDES (refused with replicas > 1 before anything is built) names exactly the guides of
    conf/guide/ whose copies fit_replicas refuses, so the early refusal never turns away a guide that stacks."""
    from hydra import compose, initialize_config_dir

    import run
    from cli.values import UNSTACKABLE_GUIDES
    from conftest import ROOT

    refused = set()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        for guide in sorted(p.stem for p in (ROOT / "conf" / "guide").glob("*.yaml")):
            model = "dlgm" if guide in ("structured", "meanfield") else "vae"
            cfg = compose("config", overrides=[f"guide={guide}", f"model={model}", "data.n=3"])
            built = [run.build(cfg) for _ in range(2)]
            try:
                fit_replicas([b[1] for b in built], [b[2] for b in built], built[0][0], [0, 1], steps=2,
                             elbo=ClosedFormELBO(num_particles=4, noise="lattice"))
            except ValueError:
                refused.add(guide)
    assert refused == set(UNSTACKABLE_GUIDES)


# ---------------------------------------------------------------------------------------------------------------
# a replica resumed in place: it stays a seed of its group, and its group's status.json says how the group stands


@pytest.fixture(scope="module")
def finished_group(tmp_path_factory):
    """A finished group of two replicas (seeds 0 and 1); tests copy it (killed_group) before touching it."""
    base = tmp_path_factory.mktemp("group")
    proc = run_cli(*FAST, "replicas=2", f"hydra.run.dir={base / 'group'}", cwd=base)
    assert proc.returncode == 0, proc.stderr
    return base / "group"


def killed_group(finished_group, where, *killed) -> Path:
    """A copy of finished_group as a SIGKILL of its process leaves it while the replicas `killed` were unfinished:
    the group's and their status.json say running (a pid that is gone), and they have no results yet."""
    import shutil

    group = where / "group"
    shutil.copytree(finished_group, group)
    for folder in [group, *(group / name for name in killed)]:
        record = json.loads((folder / "status.json").read_text())
        (folder / "status.json").write_text(json.dumps({**record, "status": "running", "pid": 999999}))
    for name in killed:
        for output in ("metrics.json", "history.csv", "encodings.nc"):
            (group / name / output).unlink()
    return group


def resume_in_place(replica, *extra, cwd):
    """Resume a replica's run in place, as its README line says."""
    seed = replica.name[len("seed"):]
    return run_cli(*FAST, f"seed={seed}", *extra, f"train.resume={replica / 'checkpoint.pt'}",
                   f"hydra.run.dir={replica}", cwd=cwd)


def test_a_replica_resumed_in_place_keeps_its_hydra_files_and_records_its_command_line_apart(finished_group, tmp_path):
    group = killed_group(finished_group, tmp_path, "seed1")
    before = {p.name: p.read_bytes() for p in (group / "seed1" / ".hydra").iterdir()}
    proc = resume_in_place(group / "seed1", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert {name: (group / "seed1" / ".hydra" / name).read_bytes() for name in before} == before
    assert "train.resume=" in (group / "seed1" / ".hydra" / "resume_overrides.yaml").read_text()


def test_a_replica_resumed_in_place_is_summarised_as_a_seed_of_its_groups_one_configuration(finished_group, tmp_path):
    import pandas as pd

    from analysis.sweep import summarize

    group = killed_group(finished_group, tmp_path, "seed1")
    assert resume_in_place(group / "seed1", cwd=tmp_path).returncode == 0
    summarize(group, figures=False)
    by_config = pd.read_csv(group / "summary_by_config.csv")
    assert len(by_config) == 1 and not any("train.resume" in column for column in by_config.columns)
    assert set(pd.read_csv(group / "summary.csv")["status"]) == {"ok"}


def test_a_replica_resumed_in_place_with_another_config_is_refused_and_left_as_it_was(finished_group, tmp_path):
    group = killed_group(finished_group, tmp_path, "seed1")
    before = {str(p): p.read_bytes() for p in sorted(group.rglob("*")) if p.is_file()}
    proc = resume_in_place(group / "seed1", "train.steps=60", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.startswith(
        f"error: train.steps=60 is not allowed in place: the replica in {group / 'seed1'} ran with train.steps=30, "
        "and its group's summary"), proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert {str(p): p.read_bytes() for p in sorted(group.rglob("*")) if p.is_file()} == before


def test_a_killed_groups_status_says_ok_once_its_last_unfinished_replica_is_resumed_in_place(finished_group, tmp_path):
    group = killed_group(finished_group, tmp_path, "seed1")
    assert resume_in_place(group / "seed1", cwd=tmp_path).returncode == 0
    status = json.loads((group / "status.json").read_text())
    losses = [json.loads((group / s / "metrics.json").read_text())["loss"] for s in ("seed0", "seed1")]
    assert status["status"] == "ok" and status["replicas"] == ["seed0", "seed1"] and "seed1 resumed" in status["reason"]
    assert status["loss"] == pytest.approx(sum(losses) / 2)


def test_a_killed_groups_status_names_the_replicas_not_yet_resumed(finished_group, tmp_path):
    group = killed_group(finished_group, tmp_path, "seed0", "seed1")
    assert resume_in_place(group / "seed1", cwd=tmp_path).returncode == 0
    status = json.loads((group / "status.json").read_text())
    assert status["status"] == "failed" and status["reason"].startswith("1 of 2 replicas did not end ok: seed0: "
                                                                        "failed: killed: its process (pid 999999)")


def test_python_replicas_trained_with_free_bits_and_sampled_kl_say_so_as_the_command_lines_replicas_do():
    from analysis.describe import describe

    data = OneBit(3)
    models = [VAE(data.n) for _ in range(2)]
    guides = [GaussianGuide(m) for m in models]
    elbo = ClosedFormELBO(num_particles=32, noise="lattice", free_bits=0.3, closed_form=False)
    results = fit_replicas(models, guides, data, seeds=[0, 1], steps=5, elbo=elbo)
    head = describe(models[0], guides[0], data, results[0])
    assert head["free_bits"] == 0.3  # what it minimised: `python run.py replicas=2 objective.free_bits=0.3` says so
    assert {k: head["arguments"].get(k) for k in ("objective.free_bits", "objective.closed_form")} == {
        "objective.free_bits": 0.3, "objective.closed_form": False}
