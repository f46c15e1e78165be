"""The sweep summary (analysis.sweep) on hand-made sweep directories laid out as Hydra and run.py write them:
it counts this sweep's jobs only, each run once, and every number in it says over which runs and by which
estimator it was computed."""
import itertools
import json
from pathlib import Path

import pytest

EXACT = "exact quadrature (1-D: adaptive Gauss-Kronrod 15 in z; error = change under refinement, {:.1e})"
RQMC = "randomised quasi-Monte Carlo, lattice rule"


def metrics(seed, loss, *, exact=True, se=None, error=1e-7, n=5, guide="gaussian"):
    """metrics.json of one run: an exact headline (with its 'exact' block) or an RQMC one (with or without an
    error bar), as analysis.report writes them."""
    m = {"model": "vae", "guide": guide, "n": n, "seed": seed, "steps": 10, "wall_seconds": 1.0, "loss": loss,
         "loss_estimator": "exact" if exact else "RQMC lattice", "loss_se": None if exact else se,
         "loss_error": error if exact else None, "recon_per_dim": loss / 10, "kl": {"z": 0.5}, "rate": 0.5,
         "estimator": EXACT.format(error) if exact else RQMC}
    if exact:
        m["exact"] = {"loss": loss, "recon_per_dim": loss / 10, "nll": loss - 0.05, "error": error,
                      "rate": 0.5}
    else:
        m["exact_skipped"] = "refused"
    return m


def job(sweep: Path, overrides: list, num=None, m=None, status="ok", replicas=()):
    """A job directory named like Hydra's override_dirname: .hydra/ (overrides.yaml, config.yaml, and hydra.yaml
    with the job number where num is given), status.json and metrics.json (m); with replicas, one
    <job>/seed<s> directory per (seed, metrics) instead of its own metrics."""
    path = sweep / ",".join(sorted(o.lstrip("+") for o in overrides))
    _run_dir(path, overrides, m, status, replicas=[f"seed{s}" for s, _ in replicas] if replicas else None)
    if num is not None:
        (path / ".hydra" / "hydra.yaml").write_text(f"hydra:\n  job:\n    num: {num}\n    id: '{num}'\n")
    for seed, rm in replicas:
        _run_dir(path / f"seed{seed}", overrides + [f"seed={seed}"], rm, "ok")
    return path


def _run_dir(path, overrides, m, status, replicas=None):
    (path / ".hydra").mkdir(parents=True)
    (path / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    keys = dict(o.lstrip("+").split("=", 1) for o in overrides)
    seed = m["seed"] if m else keys.get("seed", 0)
    (path / ".hydra" / "config.yaml").write_text(
        f"seed: {seed}\ndata:\n  n: {keys.get('data.n', 5)}\nmodel:\n  name: vae\n"
        f"guide:\n  name: {keys.get('guide', 'gaussian')}\n")
    record = {"status": status, "reason": "finished"}
    if replicas:
        record["replicas"] = replicas
    (path / "status.json").write_text(json.dumps(record))
    if m is not None:
        (path / "metrics.json").write_text(json.dumps(m))


def multirun(sweep: Path, task: list, params: dict = None):
    """multirun.yaml as Hydra's BasicSweeper saves it: the sweeper's params and the command line's overrides."""
    lines = ["hydra:", "  sweeper:", "    params:" + ("" if params else " null")]
    lines += [f"      {k}: {v}" for k, v in (params or {}).items()]
    lines += ["  overrides:", "    task:"] + [f"    - {o}" for o in task]
    (sweep / "multirun.yaml").write_text("\n".join(lines) + "\n")


def summary(sweep: Path):
    from analysis.sweep import summarize

    result = summarize(sweep, figures=False)
    return result, (sweep / "summary.md").read_text()


def config_table(md: str) -> list:
    """The rows of summary.md's 'By configuration' table as dicts of header -> cell."""
    lines = md.split("## By configuration")[1].strip().splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = list(itertools.takewhile(lambda line: line.startswith("|"), lines[2:]))  # this table's rows only
    return [dict(zip(header, (c.strip() for c in r.strip("|").split("|")))) for r in rows]


# ---------------------------------------------------------------------------------------------------------------
# this sweep's jobs only


def test_job_dirs_of_an_earlier_launch_into_the_same_folder_are_left_out(tmp_path):
    old = ["data.n=5", "train.steps=100"]
    job(tmp_path, old + ["seed=0"], num=0, m=metrics(0, 1.0))
    job(tmp_path, old + ["seed=1"], num=1, m=metrics(1, 1.2))
    new = ["data.n=5", "seed=2", "train.steps=200", "overwrite=True"]
    job(tmp_path, new, num=0, m=metrics(2, 2.0))
    multirun(tmp_path, ["data.n=5", "seed=2", "train.steps=200", "overwrite=true"])
    result, md = summary(tmp_path)
    assert list(result["jobs"]["seed"]) == [2] and len(result["left_out"]) == 2
    assert config_table(md)[0]["seeds"] == "1"
    assert "Left out: 2 job directories of other launches" in md
    assert "train.steps=100" not in md.split("Left out")[0]


def test_a_killed_job_of_an_earlier_launch_is_not_listed_as_running(tmp_path):
    job(tmp_path, ["data.n=5", "seed=0"], num=0, status="running")
    job(tmp_path, ["data.n=5", "seed=0", "overwrite=True"], num=0, m=metrics(0, 1.0))
    multirun(tmp_path, ["data.n=5", "seed=0", "overwrite=true"])
    result, md = summary(tmp_path)
    assert result["failed"] == [] and "RUNNING" not in md


def test_an_unrelated_single_run_in_the_sweep_folder_is_not_a_job_of_the_sweep(tmp_path):
    job(tmp_path / "2026-11-30", ["data.n=5", "seed=1"], m=metrics(1, 1.5))  # a single run under outputs/
    job(tmp_path, ["data.n=5", "seed=0"], num=0, m=metrics(0, 1.0))
    multirun(tmp_path, ["data.n=5", "seed=0"])
    result, md = summary(tmp_path)
    assert list(result["jobs"]["seed"]) == [0] and result["left_out"] == ["2026-11-30/data.n=5,seed=1"]
    assert "1 run in 1 job:" in md


def test_a_single_run_with_the_overrides_of_a_sweep_job_is_not_that_job(tmp_path):
    single = job(tmp_path / "2026-11-30", ["data.n=5", "seed=0"], m=metrics(0, 1.5))
    (single / ".hydra" / "hydra.yaml").write_text("hydra:\n  mode: RUN\n  job:\n    num: ???\n")
    multirun(tmp_path, ["data.n=5", "seed=0"])
    result, md = summary(tmp_path)
    assert result["jobs"].empty and result["missing"] == ["data.n=5 seed=0"]
    assert "Left out: 1 job directory of other launches" in md


def test_the_empty_folder_of_a_missing_job_is_named_beside_it(tmp_path):
    """A job on a full disk may leave its folder and nothing in it (not even status.json): it is MISSING, and the
    empty folder is named so that the user sees where it was to be."""
    job(tmp_path, ["data.n=5", "seed=0"], num=0, m=metrics(0, 1.0))
    (tmp_path / "data.n=5,seed=1").mkdir()
    multirun(tmp_path, ["data.n=5"], params={"seed": "0,1"})
    _, md = summary(tmp_path)
    assert "- MISSING seed=1 data.n=5" in md
    assert "- EMPTY `data.n=5,seed=1/`: a folder of the sweep dir that holds nothing, the dir of a missing job" in md


def test_a_job_dir_another_launch_wrote_with_its_own_job_number_is_not_counted(tmp_path):
    # two sweeps started together on one folder: seed=0,1 (this one) and seed=1,2 (its seed=1 is job 0)
    job(tmp_path, ["data.n=5", "seed=0"], num=0, m=metrics(0, 1.0))
    job(tmp_path, ["data.n=5", "seed=1"], num=0, m=metrics(1, 1.2))
    multirun(tmp_path, ["data.n=5"], params={"seed": "0,1"})
    result, md = summary(tmp_path)
    assert list(result["jobs"]["seed"]) == [0]
    assert result["missing"] == ["seed=1 data.n=5"]
    assert "MISSING seed=1 data.n=5 (no job directory of this sweep; its directory `data.n=5,seed=1` holds another " \
           "launch's job)" in md


def test_without_multirun_yaml_every_job_dir_below_counts(tmp_path):
    job(tmp_path, ["data.n=5", "seed=0"], m=metrics(0, 1.0))
    job(tmp_path / "more", ["data.n=5", "seed=1"], m=metrics(1, 1.2))
    result, _ = summary(tmp_path)
    assert sorted(result["jobs"]["seed"]) == [0, 1] and result["left_out"] == []


def test_runs_written_from_python_with_other_networks_are_other_configurations(tmp_path):
    for name, seed, arguments in [("a", 0, {}), ("b", 1, {}), ("c", 0, {"model.hidden": 16}),
                                  ("d", 1, {"model.hidden": 16})]:
        (tmp_path / name).mkdir()
        m = {**metrics(seed, 1.0 + seed + len(arguments)), **({"arguments": arguments} if arguments else {})}
        (tmp_path / name / "metrics.json").write_text(json.dumps(m))
        (tmp_path / name / "status.json").write_text(json.dumps({"status": "ok"}))
    rows = config_table(summary(tmp_path)[1])
    assert sorted((r["model.hidden"], r["seeds"]) for r in rows) == [("", "2"), ("16", "2")]


def _python_run(path, seed, loss, arguments):
    """A run directory as write_run leaves it: metrics.json (with its `arguments`) and status.json, no .hydra/."""
    path.mkdir()
    (path / "metrics.json").write_text(json.dumps({**metrics(seed, loss), "arguments": arguments}))
    (path / "status.json").write_text(json.dumps({"status": "ok"}))


def test_runs_written_from_python_with_other_training_settings_are_other_configurations(tmp_path):
    _python_run(tmp_path / "a", 0, 1.0, {"train.steps": 300})
    _python_run(tmp_path / "b", 1, 1.1, {"train.steps": 600})
    _python_run(tmp_path / "c", 0, 1.2, {"train.steps": 300, "optim.lr": 0.01})
    _python_run(tmp_path / "d", 0, 1.3, {"train.steps": 300, "train.beta": 0.5})
    result, md = summary(tmp_path)
    rows = config_table(md)
    assert len(rows) == 4 and all(r["seeds"] == "1" for r in rows)
    assert result["jobs"]["duplicate_of"].isna().all()


def test_a_python_run_and_a_command_line_run_with_the_same_settings_are_one_configuration(tmp_path):
    job(tmp_path, ["data.n=5", "seed=0", "train.steps=300", "optim.lr=1e-2"], m=metrics(0, 1.0))
    _python_run(tmp_path / "python", 1, 1.2, {"train.steps": 300, "optim.lr": 0.01})
    rows = config_table(summary(tmp_path)[1])
    assert [r["seeds"] for r in rows] == ["2"]


def test_a_glob_sweep_of_a_groups_options_is_expanded_from_the_config_sources_it_ran_with(tmp_path):
    from analysis.jobs import expected_jobs

    conf = tmp_path / "conf"
    (conf / "model").mkdir(parents=True)
    for name in ("vae", "vae2", "dlgm"):
        (conf / "model" / f"{name}.yaml").write_text("{}\n")
    multirun(tmp_path, ["model=glob(v*)", "seed=0"])
    with (tmp_path / "multirun.yaml").open("a") as f:
        f.write(f"  runtime:\n    config_sources:\n    - path: {conf}\n      schema: file\n      provider: main\n")
    assert expected_jobs(tmp_path) == [["model=vae", "seed=0"], ["model=vae2", "seed=0"]]


def hydra_draws(monkeypatch, draw):
    """Make Hydra's shuffle() draw the order `draw` gives (a function that reorders a list in place), as it draws
    one at random: the summary's expansion of the sweep then draws that order, whichever its launch drew."""
    import random

    from hydra.core.override_parser import types

    monkeypatch.setattr(random, "shuffle", draw)
    monkeypatch.setattr(types, "shuffle", draw)


@pytest.mark.parametrize("sweep", ["seed=shuffle(range(0,3))", "seed=shuffle(0,1,2)", "seed=shuffle(choice(0,1,2))",
                                   "seed=shuffle(sort(2,1,0))"])
def test_a_shuffled_sweeps_jobs_are_its_own_whatever_order_hydra_drew_for_them(tmp_path, monkeypatch, sweep):
    multirun(tmp_path, ["data.n=5", sweep])
    for num, seed in enumerate([2, 0, 1]):  # the order the launch drew
        job(tmp_path, ["data.n=5", f"seed={seed}"], num=num, m=metrics(seed, 1.0 + seed))
    hydra_draws(monkeypatch, lambda lst: None)  # the summary's draw: 0, 1, 2
    result, md = summary(tmp_path)
    assert sorted(result["jobs"]["seed"]) == [0, 1, 2] and result["missing"] == [] and result["left_out"] == []
    assert result["failed"] == [] and "Left out" not in md


def test_a_shuffled_list_value_matches_the_order_hydra_drew_for_the_job(tmp_path, monkeypatch):
    multirun(tmp_path, ["optim.betas=shuffle([0.9,0.99])", "seed=0,1"])
    for num, seed in enumerate([0, 1]):
        job(tmp_path, ["optim.betas=[0.99,0.9]", f"seed={seed}"], num=num, m=metrics(seed, 1.0))
    hydra_draws(monkeypatch, lambda lst: None)  # the summary's draw: [0.9, 0.99]
    result, _ = summary(tmp_path)
    assert sorted(result["jobs"]["seed"]) == [0, 1] and result["missing"] == [] and result["left_out"] == []


def test_a_missing_job_of_a_shuffled_list_is_named_as_the_sweep_wrote_it(tmp_path):
    multirun(tmp_path, ["optim.betas=shuffle([0.9,0.99])", "seed=0,1"])
    job(tmp_path, ["optim.betas=[0.99,0.9]", "seed=0"], num=0, m=metrics(0, 1.0))
    result, _ = summary(tmp_path)
    assert result["missing"] == ["optim.betas=shuffle([0.9,0.99]) seed=1"]


def test_a_job_dir_of_a_shuffled_sweep_with_another_value_is_still_left_out(tmp_path):
    multirun(tmp_path, ["data.n=5", "seed=shuffle(0,1)"])
    job(tmp_path, ["data.n=5", "seed=0"], num=1, m=metrics(0, 1.0))
    job(tmp_path, ["data.n=5", "seed=7"], num=0, m=metrics(7, 1.0))
    result, _ = summary(tmp_path)
    assert list(result["jobs"]["seed"]) == [0] and result["missing"] == ["data.n=5 seed=1"]
    assert result["left_out"] == ["data.n=5,seed=7"]


@pytest.mark.parametrize("sweep, seeds", [("seed=sort(2,0,1)", [0, 1, 2]), ("seed=sort(0,2,1,reverse=true)", [2, 1, 0]),
                                          ("seed=choice(2,0,1)", [2, 0, 1]), ("seed=range(0,6,2)", [0, 2, 4]),
                                          ("seed=tag(a,choice(1,0))", [1, 0])])
def test_a_sweep_in_hydras_other_sweep_functions_matches_its_jobs_by_number(tmp_path, sweep, seeds):
    multirun(tmp_path, ["data.n=5", sweep])
    for num, seed in enumerate(seeds):  # Hydra's order, which these functions fix
        job(tmp_path, ["data.n=5", f"seed={seed}"], num=num, m=metrics(seed, 1.0))
    result, _ = summary(tmp_path)
    assert sorted(result["jobs"]["seed"]) == sorted(seeds) and result["missing"] == [] and result["left_out"] == []


# ---------------------------------------------------------------------------------------------------------------
# each run once


def test_replicas_overlapping_another_jobs_seeds_are_counted_once(tmp_path):
    # replicas=2 seed=0,1: job seed=0 trains seeds 0, 1; job seed=1 trains seeds 1, 2
    job(tmp_path, ["replicas=2", "seed=0"], num=0, replicas=[(0, metrics(0, 1.0)), (1, metrics(1, 2.0))])
    job(tmp_path, ["replicas=2", "seed=1"], num=1, replicas=[(1, metrics(1, 2.0)), (2, metrics(2, 3.0))])
    multirun(tmp_path, ["replicas=2"], params={"seed": "0,1"})
    result, md = summary(tmp_path)
    row = result["aggregated"].iloc[0]
    assert row["seeds"] == 3 and row["loss_mean"] == pytest.approx(2.0) and row["loss_sd"] == pytest.approx(1.0)
    assert result["duplicates"] == ["replicas=2,seed=1/seed1"]
    assert "Dropped: 1 duplicate run" in md and config_table(md)[0]["seeds"] == "3"


def test_a_sweep_of_replicas_says_how_many_runs_its_jobs_trained(tmp_path):
    job(tmp_path, ["replicas=2", "data.n=5"], num=0, replicas=[(0, metrics(0, 1.0)), (1, metrics(1, 2.0))])
    job(tmp_path, ["replicas=2", "data.n=10"], num=1,
        replicas=[(0, metrics(0, 1.0, n=10)), (1, metrics(1, 2.0, n=10))])
    multirun(tmp_path, ["replicas=2"], params={"data.n": "5,10"})
    result, md = summary(tmp_path)
    assert "4 runs in 2 jobs (replicas: one run per seed)" in md
    assert result["launched"] == ["data.n=10,replicas=2", "data.n=5,replicas=2"] and len(result["jobs"]) == 4


# ---------------------------------------------------------------------------------------------------------------
# every mean over the runs it says


def test_an_exact_column_is_used_only_when_every_run_has_the_exact_value(tmp_path):
    for seed, loss in enumerate((1.0, 2.0)):
        job(tmp_path, [f"seed={seed}"], m=metrics(seed, loss))
    job(tmp_path, ["seed=2"], m=metrics(2, 6.0, exact=False, se=0.01))  # quadrature refused: RQMC headline
    _, md = summary(tmp_path)
    row = config_table(md)[0]
    assert "loss [exact]" not in row and row["seeds"] == "3"
    loss = next(v for k, v in row.items() if k.startswith("loss ["))
    assert loss.startswith("3.0000 ± ")  # the mean of all three headlines, not 1.5 over the exact two
    assert "exact (2 of 3), RQMC lattice (1 of 3)" in md
    assert row["NLL [exact]"].endswith("(2 of 3)")
    estimators = next(line for line in md.splitlines() if line.startswith("Estimators"))
    assert RQMC in estimators and "error = change under refinement" in estimators


def test_every_number_column_of_the_by_configuration_table_names_its_estimator(tmp_path):
    for seed, loss in enumerate((1.0, 2.0)):
        m = {**metrics(seed, loss), "kl": {"z1": 0.2, "z2": 0.3}, "khat": [0.1, 0.2], "gaussian_optimum": 0.9,
             "gap_to_gaussian_optimum": loss - 0.9, "surgery": {"mutual_info": 0.4, "marginal_kl": 0.1}}
        m["exact"]["gap"] = 0.05
        job(tmp_path, [f"seed={seed}"], m=m)
    header = list(config_table(summary(tmp_path)[1])[0])
    numbers = [h for h in header if h not in ("model", "guide", "n", "seeds")]
    assert len(numbers) >= 11 and all(h.endswith("]") and "[" in h for h in numbers), numbers


def test_where_configurations_differ_in_estimator_each_rate_cell_names_its_own(tmp_path):
    job(tmp_path, ["data.n=5"], m=metrics(0, 1.0, n=5))
    job(tmp_path, ["data.n=10"], m=metrics(0, 2.0, n=10, exact=False, se=0.01))
    rows = config_table(summary(tmp_path)[1])
    rate = next(k for k in rows[0] if k.startswith("rate (= KL)"))
    assert rate == "rate (= KL) [headline]"
    assert sorted(r[rate] for r in rows) == ["0.5000 [RQMC lattice]", "0.5000 [exact]"]


def test_a_headline_cell_a_configuration_has_no_value_for_stays_empty_without_an_estimator_tag(tmp_path):
    job(tmp_path, ["data.n=5"], m={**metrics(0, 1.0, n=5), "gap_to_gaussian_optimum": 0.1})
    job(tmp_path, ["data.n=10"], m=metrics(0, 2.0, n=10, exact=False, se=0.01))  # no Gaussian optimum (latent_dim=2)
    rows = config_table(summary(tmp_path)[1])
    gap = "above the Gaussian optimum [headline]"
    assert sorted(r[gap] for r in rows) == ["", "0.1000 [exact]"]


def test_the_exact_column_is_the_exact_mean_when_every_run_has_one(tmp_path):
    for seed, loss in enumerate((1.0, 2.0)):
        job(tmp_path, [f"seed={seed}"], m=metrics(seed, loss))
    row = config_table(summary(tmp_path)[1])[0]
    assert row["loss [exact]"] == "1.5000 ± 0.7071" and row["NLL [exact]"] == "1.4500 ± 0.7071"


def test_a_loss_standard_error_is_printed_only_where_every_run_has_one(tmp_path):
    job(tmp_path, ["seed=0"], m=metrics(0, 1.0, exact=False, se=0.0025))
    job(tmp_path, ["seed=1"], m=metrics(1, 1.1, exact=False, se=None))  # tail k-hat >= 0.5: no error bar
    job(tmp_path, ["seed=2"], m=metrics(2, 1.2, exact=False, se=None))
    _, md = summary(tmp_path)
    row = config_table(md)[0]
    se = next(v for k, v in row.items() if k.startswith("loss SE"))
    assert se == "no error bar (1 of 3)" and "0.0025" not in md.split("## Runs")[0]


def test_the_loss_standard_error_is_said_to_be_a_mean_of_per_run_standard_errors(tmp_path):
    job(tmp_path, ["seed=0"], m=metrics(0, 1.0, exact=False, se=0.002))
    job(tmp_path, ["seed=1"], m=metrics(1, 1.1, exact=False, se=0.004))
    _, md = summary(tmp_path)
    (header, se), = [(k, v) for k, v in config_table(md)[0].items() if k.startswith("loss SE")]
    assert se == "0.0030" and "mean of per-run SEs" in header and "not the sd over seeds" in md


# ---------------------------------------------------------------------------------------------------------------
# labels


def test_each_run_of_the_runs_table_names_its_loss_estimator(tmp_path):
    job(tmp_path, ["seed=0"], m=metrics(0, 1.0))
    job(tmp_path, ["seed=1"], m=metrics(1, 1.1, exact=False, se=0.01))
    result, md = summary(tmp_path)
    header = next(line for line in md.splitlines() if line.startswith("| job |"))
    assert "| loss | loss_estimator |" in header and "| exact |" in md and "| RQMC lattice |" in md


def test_the_estimators_line_quotes_the_largest_integration_error_of_a_configuration(tmp_path):
    job(tmp_path, ["seed=0"], m=metrics(0, 1.0, error=1e-7))
    job(tmp_path, ["seed=1"], m=metrics(1, 1.1, error=5e-6))
    _, md = summary(tmp_path)
    line = next(line for line in md.splitlines() if line.startswith("Estimators"))
    assert "5.0e-06" in line and "1.0e-07" not in line and "largest integration error" in line


def test_overrides_the_same_in_every_run_are_named_once(tmp_path):
    for seed in (0, 1):
        job(tmp_path, ["model.depth=3", "train.steps=100", f"seed={seed}"], num=seed, m=metrics(seed, 1.0))
    multirun(tmp_path, ["model.depth=3", "train.steps=100", "seed=0,1"])
    _, md = summary(tmp_path)
    assert "Fixed (the same in every run): `model.depth=3`, `train.steps=100`." in md


def test_runs_that_composed_a_recipe_are_named_with_it(tmp_path):
    """objective=exact model=dlgm composes conf/recipe/exact_dlgm.yaml: its networks are not the dlgm option's, which
    the row's model name alone does not say."""
    recipe = "conf/recipe/exact_dlgm.yaml"
    for num, objective in enumerate(("closed_form", "exact")):
        m = {**metrics(0, 1.0 + num), **({"recipe": recipe} if objective == "exact" else {})}
        job(tmp_path, [f"objective={objective}"], num=num, m=m)
    multirun(tmp_path, ["objective=closed_form,exact"])
    _, md = summary(tmp_path)
    assert f"`{recipe}` in 1 run." in md.split("## By configuration")[0]


# ---------------------------------------------------------------------------------------------------------------
# figures: one curve per configuration family


def two_guides_two_betas(sweep):
    k = 0
    for guide in ("gaussian", "flow"):
        for beta in ("0.5", "2"):
            for n in (5, 10):
                job(sweep, [f"guide={guide}", f"train.beta={beta}", f"data.n={n}"], num=k,
                    m=metrics(0, 1.0 + k / 10, n=n, guide=guide))
                k += 1


def test_sweep_figures_draw_a_curve_per_guide_and_varying_override(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    from analysis.sweep import summarize

    two_guides_two_betas(tmp_path)
    legends = {}
    monkeypatch.setattr(Figure, "savefig", lambda fig, path, **kw: legends.update(
        {Path(path).name: [t.get_text() for t in fig.axes[0].get_legend().get_texts()]}))
    summarize(tmp_path)
    for name in ("loss_vs_n.png", "recon_per_dim_vs_n.png"):
        curves = sorted(t for t in legends[name] if t.startswith("vae ("))
        assert curves == sorted(f"vae ({g} guide, train.beta={b}) [exact]" for g in ("flow", "gaussian")
                                for b in ("0.5", "2")), name


def test_where_the_curves_estimators_differ_each_curve_names_its_own(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    from analysis.sweep import summarize

    k = 0
    for guide, exact in (("gaussian", True), ("flow", False)):
        for n in (5, 10):
            job(tmp_path, [f"guide={guide}", f"data.n={n}"], num=k,
                m=metrics(0, 1.0 + k / 10, n=n, guide=guide, exact=exact, se=0.01))
            k += 1
    legends = {}
    monkeypatch.setattr(Figure, "savefig", lambda fig, path, **kw: legends.update(
        {Path(path).name: [t.get_text() for t in fig.axes[0].get_legend().get_texts()]}))
    summarize(tmp_path)
    curves = sorted(t for t in legends["loss_vs_n.png"] if t.startswith("vae ("))
    assert curves == ["vae (flow guide) [RQMC lattice]", "vae (gaussian guide) [exact]"]


def test_the_encodings_grid_has_a_row_per_guide_and_varying_override(tmp_path, monkeypatch):
    import analysis.sweep_figures
    from analysis.sweep import encodings_figure, summarize

    two_guides_two_betas(tmp_path)
    jobs = summarize(tmp_path, figures=False)["jobs"]
    jobs["encodings"] = "unused.nc"
    cells = {}
    monkeypatch.setattr(analysis.sweep_figures, "encoding_grid", lambda c, path, title: cells.update(c))
    monkeypatch.setattr("analysis.encodings.load", lambda path: path)
    encodings_figure(jobs, tmp_path)
    assert sorted({row for row, _ in cells}) == sorted(
        f"vae ({g} guide, train.beta={b})" for g in ("flow", "gaussian") for b in ("0.5", "2"))
    assert len(cells) == 8 and all(v is not None for v in cells.values())


def test_an_ok_run_that_lost_its_metrics_is_listed_as_such_not_as_killed_before_it_started(tmp_path):
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    multirun(sweep, ["seed=0,1"], {"seed": "0,1"})
    job(sweep, ["seed=0"], num=0, m=metrics(0, 1.0))
    lost = job(sweep, ["seed=1"], num=1, m=metrics(1, 1.0))
    (lost / "metrics.json").unlink()
    _, md = summary(sweep)
    assert "its status.json says ok but its metrics.json is missing" in md and "killed before it started" not in md


def test_a_diverged_run_that_lost_its_status_json_is_still_diverged(tmp_path):
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    multirun(sweep, ["seed=0,1"], {"seed": "0,1"})
    job(sweep, ["seed=0"], num=0, m=metrics(0, 1.0))
    diverged = job(sweep, ["seed=1"], num=1, m={"seed": 1, "n": 5, "model": "vae", "guide": "gaussian",
                                               "status": "diverged", "reason": "loss nan at step 12", "loss": None})
    (diverged / "status.json").unlink()
    result, md = summary(sweep)
    assert "1 ok, 1 not ok" in md and "loss nan at step 12" in md


def started(job_dir: Path, when: str) -> None:
    record = json.loads((job_dir / "status.json").read_text())
    (job_dir / "status.json").write_text(json.dumps({**record, "started": when}))


@pytest.mark.parametrize("with_multirun_yaml", [True, False], ids=["basic", "optuna"])
def test_a_job_dir_an_earlier_launch_left_is_not_this_launchs_even_where_its_overrides_match(tmp_path,
                                                                                         with_multirun_yaml):
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    if with_multirun_yaml:
        multirun(sweep, ["seed=0,1"], {"seed": "0,1"})
    (sweep / ".sweep.lock").write_text("pid 1, started 2026-12-02T10:00:00\n")
    started(job(sweep, ["seed=0"], num=0, m=metrics(0, 1.0)), "2026-12-02T10:00:05")
    started(job(sweep, ["seed=1"], num=1, m=metrics(1, 2.0)), "2026-12-02T09:00:00")  # the earlier launch's
    result, md = summary(sweep)
    assert list(result["jobs"]["seed"]) == [0] and result["left_out"] == ["seed=1"]
    assert result["missing"] == (["seed=1"] if with_multirun_yaml else [])


def test_a_configuration_some_of_whose_seeds_failed_says_how_many_of_its_runs_it_averages(tmp_path):
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    multirun(sweep, ["seed=0,1,2"], {"seed": "0,1,2"})
    for seed in (0, 1):
        job(sweep, [f"seed={seed}"], num=seed, m=metrics(seed, 1.0 + seed))
    job(sweep, ["seed=2"], num=2, m={"seed": 2, "n": 5, "model": "vae", "guide": "gaussian", "status": "diverged",
                                     "reason": "loss nan at step 3", "loss": None}, status="diverged")
    _, md = summary(sweep)
    assert "| 2 of 3 (1 not ok) |" in md


@pytest.mark.parametrize("kind", ["a run's directory", "an empty folder"])
def test_summarising_a_folder_that_holds_no_sweep_is_refused_in_one_line_and_writes_nothing(tmp_path, kind):
    from analysis.sweep import main

    folder = tmp_path / "run"
    if kind == "a run's directory":
        _run_dir(folder, ["seed=0"], metrics(0, 1.0), "ok")
    else:
        folder.mkdir()
    before = sorted(p.name for p in folder.rglob("*"))
    with pytest.raises(SystemExit) as exit_:
        main([str(folder)])
    assert exit_.value.code == 2 and sorted(p.name for p in folder.rglob("*")) == before


def summary_command(capsys, *argv):
    """(exit code, stdout, stderr's lines) of `python -m analysis.sweep argv...` (analysis.sweep.main)."""
    from analysis.sweep import main

    with pytest.raises(SystemExit) as exit_:
        main(list(argv))
        raise SystemExit(0)
    out, err = capsys.readouterr()
    return exit_.value.code, out, [line for line in err.splitlines() if line.strip()]


@pytest.mark.parametrize("make, said", [
    (lambda p: p.write_text("x"), "is a file, not a directory"),
    (lambda p: p.symlink_to(p.parent / "gone"), "is a broken link, not a directory"),
    (lambda p: None, "does not exist"),
], ids=["a file", "a broken link", "nothing"])
def test_the_summary_command_given_no_directory_says_what_the_path_is_in_one_line(tmp_path, capsys, make, said):
    path = tmp_path / "given"
    make(path)
    code, out, err = summary_command(capsys, str(path))
    assert code == 2 and out == "" and len(err) == 1 and err[0].startswith("error: ") and said in err[0]
    assert str(path) in err[0]


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_the_summary_command_prints_its_usage_for_help_and_exits_0(capsys, flag):
    code, out, err = summary_command(capsys, flag)
    assert code == 0 and out.startswith("usage: python -m analysis.sweep [-h] SWEEP_DIR") and err == []


@pytest.mark.parametrize("argv, said", [
    ([], "analysis.sweep takes one sweep directory, given none; usage: "),
    (["a", "b"], "analysis.sweep takes one sweep directory, given 2 (a b); usage: "),
    (["--bogus", "a"], "--bogus is not an option of analysis.sweep: it takes one sweep directory"),
    (["a", "-x"], "-x is not an option of analysis.sweep"),
], ids=["no argument", "two arguments", "an unknown option", "an unknown short option"])
def test_the_summary_command_refuses_arguments_other_than_one_directory_in_one_line(capsys, argv, said):
    code, out, err = summary_command(capsys, *argv)
    assert code == 2 and out == "" and len(err) == 1 and err[0].startswith(f"error: {said}"), err


def test_the_summary_command_takes_a_directory_named_like_an_option_after_a_double_dash(tmp_path, capsys,
                                                                                          monkeypatch):
    sweep = tmp_path / "-sweep"
    sweep.mkdir()
    multirun(sweep, ["seed=0"])
    job(sweep, ["seed=0"], num=0, m=metrics(0, 1.0))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("analysis.sweep._figures", lambda agg, jobs, sweep_dir: [])
    code, out, err = summary_command(capsys, "--", "-sweep")
    assert code == 0 and out.startswith("# Sweep summary") and (sweep / "summary.md").exists()


def test_a_sweep_of_replicas_names_the_groups_replicas_not_the_replica_dirs_replicas_1(tmp_path):
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    multirun(sweep, ["data.n=5", "replicas=2"])
    group = job(sweep, ["data.n=5", "replicas=2"], num=0, replicas=[(0, metrics(0, 1.0)), (1, metrics(1, 1.1))])
    for seed in (0, 1):  # as run.py writes a replica's dir: `python run.py <its overrides>` runs it alone
        (group / f"seed{seed}" / ".hydra" / "overrides.yaml").write_text(f"- data.n=5\n- seed={seed}\n- replicas=1\n")
    _, md = summary(sweep)
    assert "replicas=2" in md and "replicas=1" not in md


def test_an_earlier_launchs_run_put_back_under_this_launchs_job_number_is_left_out_for_its_refusal_record(tmp_path):
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    multirun(sweep, ["seed=0", "data.n=5"])
    old = job(sweep, ["seed=0", "data.n=5"], num=0, m=metrics(0, 1.0))
    status = json.loads((old / "status.json").read_text())
    (old / "status.json").write_text(json.dumps({**status, "started": "2026-01-01T00:00:00"}))
    record = job(sweep / "_refused", ["seed=0", "data.n=5"], num=0, status="refused")
    status = json.loads((record / "status.json").read_text())
    (record / "status.json").write_text(json.dumps({**status, "started": "2026-01-02T00:00:00"}))
    result, md = summary(sweep)
    assert result["failed"] and not result["missing"] and result["left_out"] == [str(old.relative_to(sweep))]


def test_a_single_run_of_replicas_is_summarised_per_seed(tmp_path):
    group = job(tmp_path, ["replicas=2"], replicas=[(0, metrics(0, 1.0)), (1, metrics(1, 1.1))])
    result, _ = summary(group)
    assert len(result["jobs"]) == 2 and not result["failed"]


# ---------------------------------------------------------------------------------------------------------------
# a job whose status.json still says running


def running_job(tmp_path, **status):
    path = job(tmp_path, ["seed=1"], m=None, status="running")
    (path / "status.json").write_text(json.dumps({"status": "running", "reason": "", **status}))
    job(tmp_path, ["seed=0"], m=metrics(0, 1.0))
    return path


def test_a_job_whose_process_ended_without_recording_how_is_listed_killed(tmp_path):
    import socket

    running_job(tmp_path, pid=2 ** 22 + 7, host=socket.gethostname())  # no such process: SIGKILL left it running
    md = summary(tmp_path)[1]
    assert "1 failed" in md and "killed: its process (pid 4194311) ended without recording how" in md


def test_a_job_still_training_is_listed_running_with_its_pid(tmp_path):
    import subprocess
    import sys

    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        running_job(tmp_path, pid=alive.pid)
        md = summary(tmp_path)[1]
    finally:
        alive.kill()
    assert "1 running" in md and f"still running (pid {alive.pid})" in md


def test_a_job_running_on_another_host_is_not_judged_from_this_one(tmp_path):
    running_job(tmp_path, pid=2 ** 22 + 7, host="node-that-is-not-this-one")
    md = summary(tmp_path)[1]
    assert "1 running" in md and "still running on node-that-is-not-this-one, or killed there" in md


def test_once_the_sweep_has_ended_a_job_still_running_on_another_host_is_listed_killed(tmp_path):
    from analysis.sweep import summarize

    running_job(tmp_path, pid=2 ** 22 + 7, host="node-that-is-not-this-one")
    summarize(tmp_path, figures=False, ended=True)
    md = (tmp_path / "summary.md").read_text()
    assert "1 failed" in md and "killed: its process (pid 4194311 on node-that-is-not-this-one)" in md


def test_the_summary_leaves_out_a_khat_the_near_constant_weights_make_uninformative():
    import math

    from analysis.jobs import informative_khat_max

    psis = {"ess_fraction": [0.99999, 0.7]}
    assert informative_khat_max({"khat": [1.4, 0.6], "psis": psis}) == 0.6
    assert math.isnan(informative_khat_max({"khat": [1.4, 0.6], "psis": {"ess_fraction": [0.999, 0.995]}}))
    assert informative_khat_max({"khat": [0.3, 0.6]}) == 0.6  # no ESS recorded: every k-hat counts


def test_a_mean_too_small_for_four_decimals_is_written_with_its_digits():
    from analysis.summary_md import _pm

    assert _pm(2.1e-05, 1.5e-05) == "2.10e-05 ± 1.50e-05"
    assert _pm(0.7176, 0.0017) == "0.7176 ± 0.0017"
    assert _pm(0.0, 0.0) == "0.0000 ± 0.0000"


def test_overrides_that_change_no_number_neither_split_configurations_nor_fill_the_fixed_line(tmp_path):
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    job(sweep, ["seed=0", "overwrite=true", "eval.figures=false"], m=metrics(0, 1.0))
    job(sweep, ["seed=1", "eval.figures=false"], m=metrics(1, 1.2))
    result, md = summary(sweep)
    assert len(result["aggregated"]) == 1 and "overwrite" not in md.split("## Runs")[0]
    assert "eval.figures" not in md.split("## By configuration")[0]


def two_seeds_one_hurt(tmp_path):
    """A sweep of seeds 0 and 1, both ok: (its dir, seed 1's job dir), for a test to damage."""
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    multirun(sweep, ["seed=0,1"], {"seed": "0,1"})
    job(sweep, ["seed=0"], num=0, m=metrics(0, 1.0))
    return sweep, job(sweep, ["seed=1"], num=1, m=metrics(1, 2.0))


# what a damaged .hydra/overrides.yaml may hold: not YAML, nothing, or YAML that is no list of overrides a job ran
DAMAGED_OVERRIDES = {"not YAML": "seed: [1\n", "empty": "", "a line cut short": "- seed=[\n", "no key=value": "- 5\n",
                     "a sweep": "- seed=0,1\n", "a mapping in the list": "- {seed: 1}\n", "a mapping": "seed: 1\n",
                     "a value cut short": "- seed=1\n- data.n='5\n"}


@pytest.mark.parametrize("corrupt", DAMAGED_OVERRIDES.values(), ids=DAMAGED_OVERRIDES.keys())
def test_a_job_whose_overrides_yaml_is_corrupt_is_found_by_the_overrides_its_hydra_yaml_records(tmp_path, corrupt):
    sweep, hurt = two_seeds_one_hurt(tmp_path)
    (hurt / ".hydra" / "hydra.yaml").write_text("hydra:\n  job:\n    num: 1\n  overrides:\n    task:\n    - seed=1\n")
    (hurt / ".hydra" / "overrides.yaml").write_text(corrupt)
    result, md = summary(sweep)
    assert "MISSING" not in md and "Left out" not in md
    assert sorted(result["jobs"]["seed"]) == [0, 1] and result["failed"] == []


def test_a_job_found_by_its_hydra_yaml_says_its_overrides_yaml_is_unreadable(tmp_path):
    sweep, hurt = two_seeds_one_hurt(tmp_path)
    (hurt / ".hydra" / "hydra.yaml").write_text("hydra:\n  job:\n    num: 1\n  overrides:\n    task:\n    - seed=1\n")
    (hurt / ".hydra" / "overrides.yaml").write_text("- seed=[\n")
    _, md = summary(sweep)
    assert "- NOTE `seed=1`: .hydra/overrides.yaml unreadable ('seed=[' is not an override Hydra can read): its " \
           "overrides are read from its .hydra/hydra.yaml" in md


@pytest.mark.parametrize("corrupt", ["seed: [1\n", "- seed=[\n"], ids=["not YAML", "a line cut short"])
def test_a_job_whose_overrides_are_unreadable_is_found_by_its_job_number_where_this_launch_ran_it(tmp_path, corrupt):
    from analysis.jobs import SWEEP_LOCK

    sweep, hurt = two_seeds_one_hurt(tmp_path)
    (sweep / SWEEP_LOCK).write_text("pid 1, started 2026-12-02T00:00:00")
    (hurt / ".hydra" / "overrides.yaml").write_text(corrupt)
    (hurt / "status.json").write_text(json.dumps({"status": "ok", "launch": "pid 1, started 2026-12-02T00:00:00"}))
    result, md = summary(sweep)
    assert "MISSING" not in md and sorted(result["jobs"]["seed"]) == [0, 1] and result["failed"] == []


@pytest.mark.parametrize("overrides, hydra", [("x: [\n", "x: [\n"),
                                              ("- seed=[\n", "hydra:\n  overrides:\n    task:\n    - seed=[\n")],
                         ids=["not YAML", "lines cut short"])
def test_a_job_dir_whose_hydra_files_are_all_unreadable_is_named_beside_the_missing_job(tmp_path, overrides, hydra):
    sweep, hurt = two_seeds_one_hurt(tmp_path)
    (hurt / ".hydra" / "overrides.yaml").write_text(overrides)
    (hurt / ".hydra" / "hydra.yaml").write_text(hydra)
    _, md = summary(sweep)
    assert "- MISSING seed=1" in md and "- UNREADABLE `seed=1`: neither its .hydra/overrides.yaml nor" in md


# ---------------------------------------------------------------------------------------------------------------
# writing the summary: whole or not at all


def failing_writes(monkeypatch, folder: Path, error: int, name: str = ""):
    """Make every file opened for writing in folder whose name contains name fail with the OS error `error`, as a
    read-only folder does (EROFS) or a full disk (ENOSPC, after part of the file is written). A chmod would not
    do: the tests may run as root."""
    import builtins
    import errno
    import io
    import os

    real = builtins.open

    def guarded(file, mode="r", *args, **kwargs):
        path = Path(os.fspath(file)) if isinstance(file, (str, os.PathLike)) else None
        if path is not None and path.parent == folder and name in path.name and set(mode) & set("wax+"):
            if error == errno.ENOSPC:
                with real(file, "w") as handle:
                    handle.write("half a fi")
            raise OSError(error, os.strerror(error), str(file))
        return real(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", guarded)
    monkeypatch.setattr(io, "open", guarded)


def files_of(folder: Path) -> dict:
    """{name: bytes} of the files directly in folder."""
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


@pytest.mark.parametrize("error, name, named", [("EROFS", "", "summary.csv"), ("ENOSPC", "summary.md", "summary.md")],
                         ids=["read-only folder", "disk full at summary.md"])
def test_a_summary_that_cannot_be_written_is_one_line_naming_the_file_and_the_old_summary_stays_whole(
        tmp_path, monkeypatch, capsys, error, name, named):
    import errno
    import os

    from analysis.sweep import main

    job(tmp_path, ["seed=0"], m=metrics(0, 1.0))
    summary(tmp_path)
    before = files_of(tmp_path)
    job(tmp_path, ["seed=1"], m=metrics(1, 2.0))  # a new run: the summary would change
    failing_writes(monkeypatch, tmp_path, getattr(errno, error), name)
    with pytest.raises(SystemExit) as exit_:
        main([str(tmp_path)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"error: cannot write {tmp_path / named}: {os.strerror(getattr(errno, error))}")
    assert files_of(tmp_path) == before


def test_the_sweeps_end_callback_reports_a_summary_it_cannot_write_and_leaves_the_old_one_whole(tmp_path,
                                                                                                  monkeypatch):
    import errno

    from analysis.callbacks import LAST, SweepSummary

    job(tmp_path, ["seed=0"], m=metrics(0, 1.0))
    summary(tmp_path)
    before = files_of(tmp_path)
    job(tmp_path, ["seed=1"], m=metrics(1, 2.0))
    failing_writes(monkeypatch, tmp_path, errno.ENOSPC)
    monkeypatch.setitem(LAST, "failed", [])  # an earlier sweep's outcome in this process: all ok
    SweepSummary(figures=False)._write_summary(tmp_path, ended=True)
    [(where, reason)] = LAST["failed"]
    assert where == str(tmp_path) and f"cannot write {tmp_path / 'summary.csv'}: No space left on device" in reason
    assert files_of(tmp_path) == before


def test_a_figure_that_fails_half_written_leaves_the_old_figure_whole(tmp_path, monkeypatch):
    import analysis.sweep

    job(tmp_path, ["data.n=5"], m=metrics(0, 1.0))
    job(tmp_path, ["data.n=10"], m=metrics(0, 1.0, n=10))
    (tmp_path / "loss_vs_n.png").write_bytes(b"the old figure")

    def half_written(agg, jobs, out):
        (Path(out) / "loss_vs_n.png").write_bytes(b"half a fi")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(analysis.sweep, "sweep_figures", half_written)
    analysis.sweep.summarize(tmp_path)
    assert (tmp_path / "loss_vs_n.png").read_bytes() == b"the old figure"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


# ---------------------------------------------------------------------------------------------------------------
# corrupt files inside a run


@pytest.mark.parametrize("content, kind", [("[]", "an array"), ('"ok"', "a string"), ("null", "null")])
def test_a_metrics_json_that_is_not_an_object_is_a_failed_run_saying_so(tmp_path, content, kind):
    job(tmp_path, ["seed=0"], m=metrics(0, 1.0))
    hurt = job(tmp_path, ["seed=1"], m=metrics(1, 2.0))
    (hurt / "metrics.json").write_text(content)
    result, md = summary(tmp_path)
    assert result["failed"] == ["seed=1"]
    assert f"- FAILED `seed=1` (seed=1): metrics.json unreadable: not a JSON object ({kind})" in md


@pytest.mark.parametrize("loss, shown", [("abc", '"abc"'), (None, "null"), (float("nan"), "NaN")])
def test_a_run_whose_headline_loss_is_not_a_number_is_a_failed_run_saying_so(tmp_path, loss, shown):
    job(tmp_path, ["seed=0"], m=metrics(0, 1.0))
    job(tmp_path, ["seed=1"], m={**metrics(1, 2.0), "loss": loss})
    result, md = summary(tmp_path)
    assert result["failed"] == ["seed=1"]
    assert f"- FAILED `seed=1` (seed=1): its headline loss is not a finite number: {shown}" in md


def test_a_run_with_no_headline_loss_is_a_failed_run_saying_so(tmp_path):
    job(tmp_path, ["seed=0"], m=metrics(0, 1.0))
    job(tmp_path, ["seed=1"], m={k: v for k, v in metrics(1, 2.0).items() if k != "loss"})
    result, md = summary(tmp_path)
    assert result["failed"] == ["seed=1"] and "- FAILED `seed=1` (seed=1): its metrics.json has no headline loss" in md


def test_the_mean_loss_is_over_the_runs_with_a_number_for_it(tmp_path):
    job(tmp_path, ["seed=0"], m=metrics(0, 1.0))
    job(tmp_path, ["seed=1"], m=metrics(1, 3.0))
    job(tmp_path, ["seed=2"], m={**metrics(2, 2.0), "loss": "abc"})
    result, md = summary(tmp_path)
    assert result["aggregated"].iloc[0]["loss_mean"] == pytest.approx(2.0)
    assert config_table(md)[0]["seeds"] == "2 of 3 (1 not ok)"


@pytest.mark.parametrize("content, why", [('{"status": "o', "not JSON: "), ("[]", "not a JSON object: an array"),
                                          ('"ok"', "not a JSON object: a string")])
def test_an_ok_run_whose_status_json_cannot_be_read_is_judged_by_its_metrics_and_the_summary_says_so(tmp_path,
                                                                                                   content, why):
    job(tmp_path, ["seed=0"], m=metrics(0, 1.0))
    hurt = job(tmp_path, ["seed=1"], m=metrics(1, 2.0))
    (hurt / "status.json").write_text(content)
    result, md = summary(tmp_path)
    assert result["failed"] == [] and "2 ok, 0 not ok" in md
    note = md.split("## Notes")[1].split("##")[0].strip()
    assert note.startswith(f"- NOTE `seed=1`: its status.json is unreadable ({why}") and \
        note.endswith("): judged by its metrics.json")


def test_a_diverged_run_whose_status_json_cannot_be_read_is_diverged_and_says_both(tmp_path):
    job(tmp_path, ["seed=0"], m=metrics(0, 1.0))
    hurt = job(tmp_path, ["seed=1"], m={**metrics(1, 2.0), "status": "diverged", "reason": "loss nan at step 12",
                                        "loss": None})
    (hurt / "status.json").write_text("[]")
    result, md = summary(tmp_path)
    assert "- DIVERGED `seed=1` (seed=1): loss nan at step 12; its status.json is unreadable (not a JSON object: " \
           "an array)" in md


def test_a_run_without_metrics_whose_status_json_cannot_be_read_says_so_not_that_it_has_none(tmp_path):
    job(tmp_path, ["seed=0"], m=metrics(0, 1.0))
    hurt = job(tmp_path, ["seed=1"], m=None)
    (hurt / "status.json").write_text("{")
    result, md = summary(tmp_path)
    assert result["failed"] == ["seed=1"] and "no status.json" not in md
    assert "- FAILED `seed=1` (seed=1): no metrics.json; its status.json is unreadable (not JSON: " in md


def test_a_replica_its_group_lists_whose_dir_is_gone_is_a_failed_run_of_its_configuration(tmp_path):
    import shutil

    sweep = tmp_path / "sweep"
    sweep.mkdir()
    multirun(sweep, ["data.n=5", "replicas=2"])
    group = job(sweep, ["data.n=5", "replicas=2"], num=0, replicas=[(0, metrics(0, 1.0)), (1, metrics(1, 1.1))])
    shutil.rmtree(group / "seed1")
    result, md = summary(sweep)
    assert result["failed"] == ["data.n=5,replicas=2/seed1"] and "2 runs in 1 job" in md
    assert "- FAILED `data.n=5,replicas=2/seed1` (data.n=5 replicas=2 seed=1): its replica dir seed1 is missing" in md
    assert config_table(md)[0]["seeds"] == "1 of 2 (1 not ok)"


def test_a_group_whose_every_replica_dir_is_gone_lists_each_as_failed(tmp_path):
    import shutil

    group = job(tmp_path, ["data.n=5", "replicas=2"], num=0, replicas=[(0, metrics(0, 1.0)), (1, metrics(1, 1.1))])
    job(tmp_path, ["data.n=10", "replicas=2"], num=1, replicas=[(0, metrics(0, 1.0, n=10))])
    for name in ("seed0", "seed1"):
        shutil.rmtree(group / name)
    result, md = summary(tmp_path)
    assert result["failed"] == ["data.n=5,replicas=2/seed0", "data.n=5,replicas=2/seed1"]


@pytest.mark.parametrize("line", [b"not a launch id\n", b"pid 12, started\n", b"\xff\xfe junk"],
                         ids=["junk", "cut short", "not text"])
def test_a_sweep_lock_whose_line_is_no_launch_id_is_taken_as_unknown_and_jobs_are_matched_by_overrides(tmp_path,
                                                                                                     line):
    from analysis.jobs import SWEEP_LOCK

    sweep = tmp_path / "sweep"
    sweep.mkdir()
    multirun(sweep, ["seed=0,1"], {"seed": "0,1"})
    for seed in (0, 1):
        done = job(sweep, [f"seed={seed}"], num=seed, m=metrics(seed, 1.0 + seed))
        (done / "status.json").write_text(json.dumps({"status": "ok", "launch": "pid 7, started 2026-12-02T00:00:00"}))
    (sweep / SWEEP_LOCK).write_bytes(line)
    result, md = summary(sweep)
    assert sorted(result["jobs"]["seed"]) == [0, 1] and result["missing"] == [] and result["left_out"] == []
    assert "2 runs in 2 jobs: 2 ok" in md


def test_a_single_run_of_replicas_summarised_on_its_own_is_one_job_of_one_run_per_seed(tmp_path):
    group = job(tmp_path, ["replicas=3"], replicas=[(s, metrics(s, 1.0 + s)) for s in range(3)])
    result, md = summary(group)
    assert "3 runs in 1 job (replicas: one run per seed): 3 ok" in md
    assert result["launched"] == ["."] and len(result["jobs"]) == 3


def test_a_sweep_with_unequal_data_weights_says_its_losses_are_w_weighted_with_floor_h_w(tmp_path):
    for seed, weights in ((0, None), (1, [0.9, 0.1])):
        extra = {"weights": weights, "entropy_floor": 0.3250829733914482} if weights else {}
        job(tmp_path, [f"seed={seed}"] + ([f"data.weights=[{weights[0]},{weights[1]}]"] if weights else []),
            m={**metrics(seed, 1.0), **extra})
    _, md = summary(tmp_path)
    assert "Units: nats per data point; where the data weights w are unequal (1 of the 2 runs: w = 0.9/0.1, H(w) = " \
           "0.3251) the loss is the w-weighted mean over the data points, whose floor is H(w), not 0." in md


def test_runs_whose_files_name_no_n_are_summarised_together_under_an_empty_n(tmp_path):
    for seed in (0, 1):
        (tmp_path / f"run{seed}").mkdir()
        m = {k: v for k, v in metrics(seed, 1.0 + seed).items() if k != "n"}
        (tmp_path / f"run{seed}" / "metrics.json").write_text(json.dumps(m))
    result, md = summary(tmp_path)
    assert result["failed"] == [] and config_table(md)[0]["n"] == "" and config_table(md)[0]["seeds"] == "2"


@pytest.mark.parametrize("field, value, said", [("model", ["vae"], "its 'model' is an array, not a string"),
                                                ("n", "five", "its 'n' is a string, not a whole number"),
                                                ("status", {"ok": 1}, "its 'status' is an object, not a string"),
                                                ("psis", "x", "its 'psis' is a string, not an object")])
def test_a_metrics_json_field_of_the_wrong_kind_is_a_failed_run_naming_it(tmp_path, field, value, said):
    (tmp_path / "run0").mkdir()
    (tmp_path / "run0" / "metrics.json").write_text(json.dumps(metrics(0, 1.0)))
    (tmp_path / "run1").mkdir()
    (tmp_path / "run1" / "metrics.json").write_text(json.dumps({**metrics(1, 2.0), field: value}))
    result, md = summary(tmp_path)
    assert result["failed"] == ["run1"] and f"- FAILED `run1` (no overrides): metrics.json malformed: {said}" in md


@pytest.mark.parametrize("value, kind", [("0.6", "a string"), (True, "true"), (False, "false")])
def test_a_metric_of_the_wrong_kind_leaves_only_that_run_out_of_its_average_and_says_so(tmp_path, value, kind):
    from analysis.aggregate import tables
    from analysis.jobs import collect

    for seed, rate in ((0, 0.5), (1, 0.7), (2, value)):
        (tmp_path / f"run{seed}").mkdir()
        (tmp_path / f"run{seed}" / "metrics.json").write_text(json.dumps({**metrics(seed, 1.0), "rate": rate}))
    result, md = summary(tmp_path)
    assert result["failed"] == []
    assert f"- NOTE `run2`: its 'rate' is {kind}, not a number: left out of that metric's average" in md
    _, agg = tables(collect(tmp_path)["rows"])
    assert agg["rate_count"].tolist() == [2] and agg["rate_mean"].tolist() == pytest.approx([0.6])


def test_a_summary_removes_what_a_killed_summary_left_and_nothing_of_a_live_one(tmp_path):
    import os
    import subprocess
    import sys

    job(tmp_path, ["seed=0"], m=metrics(0, 1.0))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    left = [tmp_path / f".figures.{dead}.x1y2", tmp_path / f".summary.md.{dead}.tmp"]
    live = [tmp_path / f".figures.{os.getppid()}.a1b2", tmp_path / f".summary.csv.{os.getppid()}.tmp"]
    fresh = tmp_path / f".summary_by_config.csv.{dead}.tmp"  # another host's summary may be writing it now
    for path in left + live + [fresh]:
        path.mkdir() if path.name.startswith(".figures") else path.write_text("half")
    for path in left + live:
        os.utime(path, (0, 0))
    (tmp_path / ".figures.notes.txt").write_text("someone's")  # not a summary's leftover: no pid
    summary(tmp_path)
    assert not any(p.exists() for p in left)
    assert all(p.exists() for p in live + [fresh]) and (tmp_path / ".figures.notes.txt").exists()


def test_a_failed_submitit_job_names_its_job_id_and_where_its_console_output_is(tmp_path):
    job(tmp_path, ["seed=0"], m=metrics(0, 1.0))
    hurt = job(tmp_path, ["seed=1"], status="failed")
    (hurt / "status.json").write_text(json.dumps({"status": "failed", "reason": "crashed: boom",
                                                  "launcher_job": "4242"}))
    (tmp_path / ".submitit" / "4242").mkdir(parents=True)
    _, md = summary(tmp_path)
    assert "- FAILED `seed=1` (seed=1): crashed: boom (submitit job 4242; its console output is in " \
           "`.submitit/4242/`)" in md


def test_a_garbled_ess_record_leaves_every_khat_counted():
    from analysis.jobs import informative_khat_max

    assert informative_khat_max({"khat": [1.4, 0.6], "psis": {"ess_fraction": "ab"}}) == 1.4


@pytest.mark.parametrize("said, shown", [("bogus", '"bogus"'), (["ok"], '["ok"]')])
def test_a_status_json_whose_status_is_no_runs_status_is_said_and_the_run_judged_by_its_metrics(tmp_path, said,
                                                                                               shown):
    job(tmp_path, ["seed=0"], m=metrics(0, 1.0))
    hurt = job(tmp_path, ["seed=1"], m=metrics(1, 2.0))
    (hurt / "status.json").write_text(json.dumps({"status": said, "reason": "finished"}))
    result, md = summary(tmp_path)
    assert result["failed"] == [] and "2 ok, 0 not ok" in md
    assert f"- NOTE `seed=1`: its status.json is unreadable (its status {shown} is none of running, ok, refused, " \
           "diverged, failed): judged by its metrics.json" in md


def test_the_loss_standard_error_column_names_the_estimators_its_errors_come_from(tmp_path):
    job(tmp_path, ["seed=0"], m=metrics(0, 1.0, exact=False, se=0.002))
    job(tmp_path, ["seed=1"], m={**metrics(1, 1.1, exact=False, se=0.004), "loss_estimator": "MC"})
    _, md = summary(tmp_path)
    header, = [k for k in config_table(md)[0] if k.startswith("loss SE")]
    assert header == "loss SE [MC / RQMC lattice] (mean of per-run SEs)"
    assert "loss SE [MC / RQMC lattice]: the mean" in md
    runs_header = next(line for line in md.splitlines() if line.startswith("| job |"))
    assert "| loss_se [loss_estimator] |" in runs_header and "[MC]" not in runs_header


@pytest.mark.parametrize("one, other, same", [("1e-2", "0.01", True), ("1_000", "1000", True), ("'x'", "x", True),
                                              ("[1, [0.9]]", "[1.0,[0.90]]", True), ("True", "true", True),
                                              ("1", "'1'", False), ("1", "true", False), ("0.1", "0.10001", False)])
def test_the_summary_groups_two_spellings_exactly_where_the_sweep_check_calls_them_one_value(one, other, same):
    """analysis.jobs.canonical (the summary's configurations) and canonical_value (the sweep's up-front check of a
    value listed twice) apply one rule."""
    from analysis.jobs import _plain_parser, canonical, canonical_value

    def parsed(text):
        return canonical_value(_plain_parser().parse_overrides([f"k={text}"])[0].value())

    assert (parsed(one) == parsed(other)) == same
    assert (canonical(one) == canonical(other)) == same


def test_a_python_runs_beta_column_holds_its_kl_weight_as_a_command_line_runs_does(tmp_path):
    _python_run(tmp_path / "plain", 0, 1.0, {"train.steps": 300})
    _python_run(tmp_path / "weighted", 0, 1.1, {"train.steps": 300, "train.beta": 0.5})
    m = json.loads((tmp_path / "weighted" / "metrics.json").read_text())
    (tmp_path / "weighted" / "metrics.json").write_text(json.dumps({**m, "beta": 0.5}))  # as write_run records it
    jobs = summary(tmp_path)[0]["jobs"].set_index("job")
    assert (jobs.loc["plain", "beta"], jobs.loc["weighted", "beta"]) == (1.0, 0.5)


def test_a_duplicate_of_two_single_runs_is_not_said_to_come_from_replicas(tmp_path):
    job(tmp_path, ["data.n=5", "seed=0", "train.steps=300"], m=metrics(0, 1.0))
    _python_run(tmp_path / "python", 0, 1.0, {"train.steps": 300})  # the same run, written from Python
    md = summary(tmp_path)[1]
    dropped = next(line for line in md.splitlines() if line.startswith("Dropped:"))
    assert "`python` = " in dropped and "another job's replicas" not in dropped


def test_the_loss_figure_of_runs_on_unequal_weights_draws_their_floor_h_w_not_ln_2(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    from analysis.sweep import summarize

    weighted = {**metrics(0, 0.65), "weights": [0.3, 0.7], "entropy_floor": 0.6108643020548935}
    job(tmp_path, ["data.n=5", "data.weights=[0.3,0.7]"], num=0, m=weighted)  # below ln 2, above H(w)
    drawn = {}
    monkeypatch.setattr(Figure, "savefig", lambda fig, path, **kw: drawn.update(
        {Path(path).name: [t.get_text() for t in fig.axes[0].get_legend().get_texts()]}))
    summarize(tmp_path)
    labels = drawn["loss_vs_n.png"]
    assert "entropy H(w) = 0.6109 (floor of the losses with w = 0.3/0.7)" in labels
    assert not [t for t in labels if "ln 2" in t or "optimum" in t or "original study" in t]  # all equal weights'


def test_the_loss_figure_draws_the_floor_of_every_weighting_however_many(tmp_path, monkeypatch):
    import math as m_

    from matplotlib.figure import Figure

    from analysis.sweep import summarize

    for num, w in enumerate((0.1, 0.2, 0.3, 0.4)):  # four weightings: more than the figure's three line styles
        h = -(w * m_.log(w) + (1 - w) * m_.log(1 - w))
        job(tmp_path, ["data.n=5", f"data.weights=[{w},{1 - w:.1f}]"], num=num,
            m={**metrics(0, h + 0.05), "weights": [w, 1 - w], "entropy_floor": h})
    drawn = {}
    monkeypatch.setattr(Figure, "savefig", lambda fig, path, **kw: drawn.update(
        {Path(path).name: [t.get_text() for t in fig.axes[0].get_legend().get_texts()]}))
    summarize(tmp_path)
    assert len([t for t in drawn["loss_vs_n.png"] if t.startswith("entropy H(w)")]) == 4


def test_the_rate_distortion_plane_leaves_out_runs_on_unequal_weights_and_says_so(tmp_path, monkeypatch):
    import analysis.rd_plane

    drawn = []
    monkeypatch.setattr(analysis.rd_plane, "rd_plane", lambda points, path, ns=None, title=None: drawn.append(
        (points, title)))
    weighted = {**metrics(0, 0.65, guide="flow"), "weights": [0.3, 0.7], "entropy_floor": 0.6108643020548935,
                "distortion": 0.1}  # R + D = 0.6 would sit below the ln 2 the plane draws, though above its H(w)
    job(tmp_path, ["data.n=5", "guide=flow", "data.weights=[0.3,0.7]"], num=0, m=weighted)
    job(tmp_path, ["data.n=5", "guide=gaussian"], num=1, m={**metrics(0, 1.1), "distortion": 0.6})
    job(tmp_path, ["data.n=5", "guide=flow"], num=2, m={**metrics(0, 1.0, guide="flow"), "distortion": 0.5})
    from analysis.sweep import summarize

    summarize(tmp_path)
    (points, title), = drawn
    assert len(points) == 2 and "1 run(s) on unequal data weights left out" in title


def test_the_rate_distortion_plane_labels_a_run_by_the_kl_weight_of_its_last_step(tmp_path, monkeypatch):
    import analysis.rd_plane

    drawn = []
    monkeypatch.setattr(analysis.rd_plane, "rd_plane", lambda points, path, ns=None, title=None: drawn.append(points))
    rising = {**metrics(0, 1.0), "distortion": 0.5, "beta": 1.0, "kl_weight_final": 0.25, "warmup": 400}
    job(tmp_path, ["data.n=5", "train.warmup=400"], num=0, m=rising)  # its warm-up still rising at its last step
    job(tmp_path, ["data.n=5", "train.beta=0.5"], num=1, m={**metrics(1, 1.1), "distortion": 0.6, "beta": 0.5})
    from analysis.sweep import summarize

    summarize(tmp_path)
    points, = drawn
    assert sorted(p["beta"] for p in points) == [0.25, 0.5]  # not train.beta = 1: it never trained at 1


def test_the_rate_distortion_plane_is_drawn_for_a_sweep_of_warm_ups_alone(tmp_path, monkeypatch):
    import analysis.rd_plane

    drawn = []
    monkeypatch.setattr(analysis.rd_plane, "rd_plane", lambda points, path, ns=None, title=None: drawn.append(points))
    rising = {**metrics(0, 1.0), "distortion": 0.5, "beta": 1.0, "kl_weight_final": 0.25, "warmup": 400}
    job(tmp_path, ["data.n=5", "train.warmup=400"], num=0, m=rising)
    job(tmp_path, ["data.n=5", "train.warmup=0"], num=1, m={**metrics(1, 1.1), "distortion": 0.6, "beta": 1.0})
    from analysis.sweep import summarize

    summarize(tmp_path)
    points, = drawn  # one family, train.beta = 1 in both, but two KL weights at their last steps
    assert sorted(p["beta"] for p in points) == [0.25, 1.0]


def test_a_setting_given_at_its_default_value_is_the_configuration_that_leaves_it_out(tmp_path):
    for seed, overrides in ((0, ["data.n=5", "seed=0", "optim.lr=3e-3"]), (1, ["data.n=5", "seed=1"])):
        path = job(tmp_path, overrides, m=metrics(seed, 1.0 + seed / 10))
        config = path / ".hydra" / "config.yaml"  # as run.py writes it: every setting the run used
        config.write_text(config.read_text() + "optim:\n  lr: 0.003\n")
    path = tmp_path / "python"  # written by write_run: its settings in metrics.json, no .hydra/
    _python_run(path, 2, 1.2, {"train.steps": 6000})
    m = json.loads((path / "metrics.json").read_text())
    (path / "metrics.json").write_text(json.dumps({**m, "arguments": {}, "settings": {"optim.lr": 0.003}}))
    rows = config_table(summary(tmp_path)[1])
    assert [r["seeds"] for r in rows] == ["3"]


def test_the_summary_command_refuses_an_onebit_threads_that_is_not_a_thread_count_in_one_line(tmp_path, capsys,
                                                                                               monkeypatch):
    monkeypatch.setenv("ONEBIT_THREADS", "abc")  # a traceback once a job's metrics were read (the models read it)
    code, out, err = summary_command(capsys, str(tmp_path))
    assert code == 2 and out == "" and len(err) == 1 and err[0].startswith("error: ONEBIT_THREADS='abc' is not "), err
