"""A run's metrics as the lines a person reads (summary_lines): the headline loss first, every number tagged with its
estimator, a standard error only where the estimator gives one, in nats per data point."""
import math


def _pm(value: float, se) -> str:
    """value ± se with the digits the standard error supports (at least 4 decimals)."""
    if se is None or not se > 0:
        return f"{value:.4f}" if se is None else f"{value:.6f} ± 0"
    digits = max(4, min(10, 1 - math.floor(math.log10(se))))
    return f"{value:.{digits}f} ± {se:.1e}" if se < 1e-4 else f"{value:.{digits}f} ± {se:.{digits}f}"


def _ex(value: float, error=None) -> str:
    """A value with the digits its error supports: 4 decimals; 3 significant digits where it is smaller than 1e-3
    and larger than its error (a gap or KL the quadrature resolves, which 4 decimals would print as 0.0000 or with
    one digit); 0.0000 where it is within its error of 0 (no sign the estimate cannot tell), and never -0.0000.
    An exact block's numbers pass its integration error; a Monte Carlo term (no error of its own) none, so the same
    term reads alike under both tags."""
    if error is not None and abs(value) <= error:
        return "0.0000"
    if 0 < abs(value) < 1e-3:
        return f"{value:.2e}"
    return f"{value:.4f}".replace("-0.0000", "0.0000")


def _header(m: dict) -> list:
    """['vae + gaussian guide, n=1000, seed=0: 8000 steps in 35.9 s, evaluation 3.6 s (nats per data point)'], with
    only the parts that are known; and a line saying what the run minimised where it was not the -ELBO (_trained_on)."""
    who = " + ".join(p for p in (m.get("model"), f"{m['guide']} guide" if m.get("guide") else None) if p)
    facts = ", ".join(f"{k}={m[k]}" for k in ("n", "weights", "seed") if m.get(k) is not None)
    head = ", ".join(p for p in (who, facts) if p) or "run"
    timing = []
    if m.get("steps") is not None:
        timing.append(f"{m['steps']} steps" + (f" in {m['wall_seconds']:.1f} s" if m.get("wall_seconds") else ""))
    if m.get("eval_seconds") is not None:
        timing.append(f"evaluation {m['eval_seconds']:.1f} s")
    unit = " (nats per data point)" if m.get("weights") is None else (
        f" (nats per data point, weighted by w; floor H(w) = {m['entropy_floor']:.4f})" if m.get("entropy_floor")
        is not None else " (nats per data point, weighted by w)")
    lines = [head + (": " + ", ".join(timing) if timing else "") + unit]
    trained = _trained_on(m)
    if trained:  # the run's objective was not the loss reported below
        lines.append(f"  trained on {trained}: the loss below is the ELBO's (recon + KL), which this run did not "
                     "minimise")
    return lines


def _trained_on(m: dict) -> str:
    """What the run minimised, where metrics.json says it was not the -ELBO (analysis.run_outputs.trained_on), as
    text; '' for a plain ELBO run."""
    parts = []
    if m.get("iwae_K"):
        parts.append(f"the IWAE-{m['iwae_K']} bound (objective=iwae)")
    if m.get("beta") is not None and m["beta"] != 1:
        parts.append(f"KL weight beta={m['beta']:g} (recon + {m['beta']:g} KL)")
    if m.get("kl_weight_final") is not None:
        parts.append(f"a KL weight still rising at its last step, {m['kl_weight_final']:.3g} (its warm-up, "
                     f"{m.get('warmup')} steps, had not ended when the run did)")
    if m.get("free_bits"):
        parts.append(f"free bits {m['free_bits']:g} (each latent site's KL term floored at {m['free_bits']:g} nats)")
    return "; ".join(parts)


def _site(name: str) -> str:
    """A latent site's printed name: a joint autoguide's auxiliary ('_AutoIAFNormal_latent') is 'joint'."""
    return "joint" if name.startswith("_") else name


def rate_terms_note(sites) -> str:
    """What each rate[s] printed for a run with several latent sites is (sites: its kl dict's keys)."""
    where = ""
    if any(s.startswith("_") for s in sites):  # a joint autoguide's auxiliary draw u, and the sites made of it
        where = (", where a site the guide makes of its joint draw u (a point mass) has for log q(s|.) its "
                 "transform's log-Jacobian (0 for a real site), and rate[joint] = E_q[log q(u|x)]")
    return (f"rate[s] = E_q[log q(s|.) - log p(s|parents)]{where}: a term of the rate, not a KL (it can be negative); "
            "only their sum, the rate, is the KL of q to the model's prior")


def _kl_text(kl: dict, tag: str, f=_ex) -> str:
    """The rate (the KL) and, with several latent sites, each site's term: rate[s] = E[log q(s|.) - log p(s|.)],
    each value written by f (an exact block's: with the digits its integration error supports, _ex)."""

    if len(kl) == 1:
        (site, value), = kl.items()
        return f"KL[{_site(site)}] {f(value)} {tag}"
    terms = " + ".join(f"rate[{_site(s)}] {f(v)}" for s, v in kl.items())
    return f"rate (= KL) {f(sum(kl.values()))} = {terms} {tag}"


def summary_lines(m: dict) -> list:
    """A short human summary of a run's metrics (evaluate()'s, or metrics.json's), every number tagged with its
    estimator. The first number is the headline loss. exact()'s and monte_carlo()'s own dicts are summarised under
    their own estimator's tag; anything else that is not a dict is refused (ValueError in one line)."""
    if not isinstance(m, dict):
        from infer.validate import refuse

        raise refuse("m", m, "m must be a metrics dict: evaluate()'s metrics, a metrics.json read back, or the dict "
                             "of analysis.exact.exact or analysis.montecarlo.monte_carlo")
    e, mc = m.get("exact"), m.get("montecarlo")
    if e is None and mc is None and str(m.get("estimator", "")).startswith("exact quadrature") and "nll" in m:
        e = m  # exact()'s own dict: its numbers are exact, not an old metrics.json's Monte Carlo ones
    elif e is None and mc is None and "kind" in m and "loss_se" in m:
        mc = m  # monte_carlo()'s own dict
    lines = _header(m)
    if e is not None:
        err = e.get("error")
        lines += [f"  loss       {e['loss']:.4f} [exact]   NLL {e['nll']:.4f} [exact]   "
                  f"ELBO gap {_ex(e['gap'], err)} [exact]",
                  f"  recon      {e['recon']:.4f} [exact]   recon/dim {e['recon_per_dim']:.3e} [exact]   "
                  + _kl_text(e["kl"], "[exact]", lambda v: _ex(v, err))]
        if "total_correlation_per_point" in e:
            lines.append(f"  joint guide: KL = the marginals' average KL + the total correlation of q(z_0, z_1) / 2 "
                         f"{_ex(e['total_correlation_per_point'], max(err or 0.0, TC_RESOLUTION))} [exact]")
    if mc is None and "estimator" in m and e is None:  # an old metrics.json: the Monte Carlo numbers at top level
        mc = {**m, "kind": "MC" if m["estimator"].startswith("Monte") else "RQMC"}
    if mc is not None:
        tag = f"[{mc['kind']}]"
        if mc.get("loss_se") is not None:
            loss = f"{_pm(mc['loss'], mc['loss_se'])} {tag}"
        else:
            loss = f"{mc['loss']:.4f} {tag}, no error bar: {mc.get('loss_note', 'no reliable standard error')}"
        if e is not None:
            diff = mc["loss"] - e["loss"]
            lines.append(f"  loss       {loss}   (check of the exact loss: {diff:+.2e}"
                         f"{_disagreement(diff, mc.get('loss_se'), e.get('error'))})")
        else:
            lines.append(f"  loss       {loss}")
        order = list((e or {}).get("kl") or {})  # the sites in the exact line's order, where there is one
        mc_kl = {**{k: mc["kl"][k] for k in order if k in mc["kl"]}, **mc["kl"]}
        lines.append(f"  recon      {mc['recon']:.4f} {tag}   recon/dim {mc['recon_per_dim']:.3e} {tag}   "
                     + _kl_text(mc_kl, tag))
    if "model_phase" in m and e is not None:
        lines.append(f"  the model was trained by its exact likelihood ({m['model_phase']['steps']} steps), then the "
                     f"guide against it, frozen: NLL {e['nll']:.4f} [exact] is the model's, the ELBO gap "
                     f"{_ex(e['gap'], e.get('error'))} [exact] the guide family's price")
    t = m.get("trained_objective")
    if isinstance(t, dict) and "loss" in t:  # what an objective=iwae run minimised, at its final parameters
        lines.append(_trained_objective_line(m, t))
    kl = (e or mc or {}).get("kl") or {}
    if len(kl) > 1:
        lines.append(f"  ({rate_terms_note(kl)})")
    if "surgery" in m:
        s = m["surgery"]
        t = s.get("site", "z")
        marginal = (f", q({t}|x) the guide's marginal" if len(kl) > 1 and not any(k.startswith("_") for k in kl)
                    else "")
        err = s.get("error")
        lines.append(f"  surgery    of {t}{marginal}: avg KL(q({t}|x)||p({t})) {_ex(s['avg_kl'], err)} = I_q(x;{t}) "
                     f"{_ex(s['mutual_info'], err)} + KL(q({t})||p({t})) {_ex(s['marginal_kl'], err)} [exact]")
    if "surgery_skipped" in m:
        lines.append(f"  surgery    skipped: {m['surgery_skipped']}")
    if "exact_nll" in m:
        lines.append(f"  NLL        {m['exact_nll']['nll']:.4f} "
                     "[exact, the model alone: the guide's loss has no quadrature]")
    if "iwae" in m:
        lines += _iwae_lines(m["iwae"], m.get("exact_nll"))
    elif "exact_skipped" in m:  # no stand-in bounds that say why (their note does)
        lines.append(f"  exact      skipped: {m['exact_skipped']}")
    if "gap_to_gaussian_optimum" in m:
        lines.append(_gap_line(m, e))
    lines += _khat_lines(m)
    if e is not None:
        lines.append(f"  [exact] = {e['estimator']}")
    if mc is not None:
        lines.append(f"  [{mc['kind']}] = {mc['estimator']}")
    return lines


def _trained_objective_line(m: dict, t: dict) -> str:
    """The trained bound (metrics['trained_objective']) of an objective=iwae run. Where m records what the run
    minimised (an 'objective', with trained_on's facts), the bound is the objective it trained on only at the KL
    weight of the run's last step (run_outputs.final_kl_weight); a bound at another weight (an older metrics.json's,
    evaluated at 1 where the run trained at beta) is said to be what it is. Without that record, the bound is the
    one evaluate() was asked for (trained_K, trained_beta)."""
    from .describe import final_kl_weight

    value = f"{_pm(t['loss'], t.get('se'))} [importance sampling]"
    at = float(t.get("beta", 1.0))
    trained = final_kl_weight(m) if "objective" in m else at
    if at == trained:
        return f"  {t.get('name', 'trained objective')} loss (the objective it trained on) {value}"
    return (f"  {t.get('name', 'trained objective')} loss {value}, at KL weight {at:g}: not the objective it "
            f"trained on, whose KL weight was {trained:g}")


def _gap_line(m: dict, e: dict = None) -> str:
    """The Gaussian-family optimum [exact] and how far this run's headline loss is above (or below) it. The gap is
    the headline minus an exact number, so it is the headline's estimate: [exact] with the quadrature's digits, or
    the Monte Carlo headline's tag and ± (its standard error: the optimum's is negligible); where that headline
    has no error bar, no gap is printed (an estimate whose error is unknown, beside an exact number)."""
    gap, est = m["gap_to_gaussian_optimum"], m.get("loss_estimator")
    head = f"  Gaussian-family optimum {m['gaussian_optimum']:.4f} [exact]; "
    if est != "exact" and m.get("loss_se") is None:
        return head + f"no gap shown: the loss [{est}] it would come from has no error bar"
    if est == "exact":
        err = e.get("error") if e is not None else None
        size = f"{_ex(abs(gap), err)} [exact]"
    else:
        size = f"{_pm(abs(gap), m['loss_se'])} [{est}]"
    return head + (f"this run is {size} above it" if gap >= 0
                   else f"this run is {size} below it (the optimum bounds Gaussian encoders only)")


def _iwae_lines(i: dict, exact_nll: dict = None) -> list:
    def pm(v, se, note):
        return _pm(v, se) if se is not None else f"{v:.4f} (no error bar: {note})"

    why = (" (± over its repeats, Student-t and skew-corrected: a log-mean of K weights has finite variance "
           "whatever the weights' k-hat)"
           if i.get("loss_se") is not None and i.get("nll_se") is None else "")
    lines = [f"  IWAE-{i['K']} loss {pm(i['loss'], i.get('loss_se'), i.get('loss_note'))} [importance sampling]{why}",
             f"  NLL        {pm(i['nll'], i.get('nll_se'), i.get('nll_note'))} [importance sampling]"]
    if exact_nll is not None:
        below = exact_nll["nll"] - i["loss"]
        if below > 0:  # an upper bound of the NLL in expectation: its estimate is below only by sampling error
            far = i.get("loss_se") and below > DISAGREE_SE * math.hypot(i["loss_se"], exact_nll.get("error") or 0)
            lines[0] += (f"; {below:.4f} below the exact NLL, "
                         + (f"{below / i['loss_se']:.1f} SE: too far for a bound's sampling error (the guide's "
                            "log-density does not match the law of its draws)" if far else
                            "a bound's sampling error" + (f" ({below / i['loss_se']:.1f} SE)" if i.get("loss_se")
                                                          else "")))
        gap = i["nll"] - exact_nll["nll"]
        se = i.get("nll_se")  # held only where the weights' k-hat says their variance is finite
        far = bool(se) and abs(gap) > DISAGREE_SE * math.hypot(se, exact_nll.get("error") or 0)
        lines[-1] += (f"; {abs(gap):.4f} {'above' if gap >= 0 else 'below'} the exact NLL"
                      + (f", {abs(gap) / se:.0f} SE with light-tailed weights: too far for sampling error (check that "
                         "the guide's log-density is that of the law of its draws)" if far else
                         ": posterior mass the guide's draws rarely reach" if gap > 0 else ""))
    lines.append(f"             ({i['note']})")
    return lines


TC_RESOLUTION = 1e-12  # a total correlation below this is float64 rounding of a sum of terms of order 1, not a value
DISAGREE_SE = 5  # a Monte Carlo estimate this many standard errors from an exact value is no sampling error


def _disagreement(diff, se, error) -> str:
    """', N SE: ...' where a Monte Carlo estimate that has an error bar misses the exact value by more than
    DISAGREE_SE of its standard error (with the quadrature's own error added): the two estimates see different
    densities (a guide whose log-density does not match the law of its draws, say); '' otherwise."""
    if se is None or not se > 0:
        return ""
    scale = math.hypot(se, error or 0.0)
    if abs(diff) <= DISAGREE_SE * scale:
        return ""
    return (f", {abs(diff) / scale:.0f} SE: the two estimates disagree beyond their errors: check that the guide's "
            "log-density is that of the law of its draws")


def _khat_lines(m: dict) -> list:
    """The PSIS k-hat line: value ± its asymptotic sd (psis.khat_sd, said as such), ESS/S, and the threshold for S
    draws; near-constant weights said in words."""
    from .psis import CONSTANT_ESS, GOOD, KHAT_SD_WORDS, interpret

    if "khat" not in m:
        return []
    p = m.get("psis")
    if p is None:  # an old metrics.json
        return ["  PSIS k-hat " + ", ".join(f"x{k}: {v:.2f}" for k, v in enumerate(m["khat"]))]
    points = [0] if p.get("joint") else range(len(m["khat"]))
    if p.get("narrow"):  # bounded weights: any k-hat looks good, and says nothing of the mass outside q's support
        values = ", ".join(f"{p['khat'][k]:.2f}" for k in points)
        return [f"  PSIS k-hat of p(x,z)/q(z|x), {p['samples']} draws: {values}, not informative: "
                f"{p['narrow']}, so the weights never see the posterior mass outside it"]
    parts = []
    for k in points:
        label = "joint" if p.get("joint") else f"x{k}"
        if p["ess_fraction"][k] >= CONSTANT_ESS:
            parts.append(f"{label}: weights nearly constant, ESS/S {p['ess_fraction'][k]:.5f} "
                         "(q matches the posterior up to noise; k-hat not informative)")
        else:
            parts.append(f"{label}: {p['khat'][k]:.2f} ± {p['sd'][k]:.2f} (ESS/S {p['ess_fraction'][k]:.3f}; "
                         f"{interpret(p['khat'][k], p['ess_fraction'][k], p['samples']).split(':')[0]})")
    lines = [f"  PSIS k-hat of p(x,z)/q(z|x), {p['samples']} draws: " + "; ".join(parts)]
    lines.append(f"             (good < {GOOD}; reliable below min(1 - 1/log10 S, 0.7) = {p['threshold']:.2f}; "
                 f"{KHAT_SD_WORDS}" + (f"; {m['khat_note']}" if "khat_note" in m else "") + ")")
    return lines
