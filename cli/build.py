"""From a composed config to the run's data, model, guide and objective (built from each node's _target_), and the
two ways a run ends early: Refused (bad input found before training: one line, no trace) and Diverged."""
import contextlib

from omegaconf import DictConfig, OmegaConf

from cli.state import ConfigError


def build(cfg: DictConfig):
    """The data, model and guide a config describes (instantiated from the _target_ of model and guide)."""
    from hydra.utils import instantiate

    from models import OneBit

    def spec(node):
        return {k: v for k, v in OmegaConf.to_container(node, resolve=True).items() if k != "name"}  # in the root

    data = OneBit(cfg.data.n, tuple(cfg.data.weights))
    model = instantiate(spec(cfg.model), n=data.n)
    guide = instantiate(spec(cfg.guide), model=model)
    return data, model, guide


# what build passes each group's _target_ besides its node's keys
INJECTED = {"model": ("n",), "guide": ("model",)}
NOT_ARGUMENTS = ("name", "_target_", "_convert_", "_recursive_", "_partial_", "_args_")


def check_targets(cfg: DictConfig) -> None:
    """Raise ConfigError, in one line, where the model's or the guide's _target_ cannot be imported, or would not
    take its node's keys (a config group of one's own, from --config-dir, included): before anything is built."""
    import inspect

    from hydra._internal.utils import _locate  # hydra.utils.get_object logs its failure over lines first

    for group, injected in INJECTED.items():
        node = cfg.get(group)
        target = node.get("_target_") if isinstance(node, DictConfig) else None
        if not isinstance(target, str):
            raise ConfigError(f"{group}._target_ is not set: a {group} option must name what it builds (e.g. "
                              f"_target_: {'models.VAE' if group == 'model' else 'guides.GaussianGuide'})")
        if node.get("name") is None:  # the run dir's name read it: "Interpolation key 'guide.name' not found
            #                           full_key: hydra.run.dir", naming neither the option nor the key
            option = OmegaConf.select(cfg, f"hydra.runtime.choices.{group}", default=None)
            example = option or f"my_{group}"
            raise ConfigError(f"{group}.name is not set{f' by {group}={option}' if option else ''}: a {group} option "
                              f"must name itself (e.g. name: {example}; letters, digits, '_' and '-'), the label of "
                              "its runs' dirs and metrics.json")
        try:
            built = _locate(target)
        except Exception as err:  # noqa: BLE001  hydra's ImportError around the import's own error
            cause = err.__cause__ or err
            why = " ".join(f"{type(cause).__name__}: {cause}".split())
            raise ConfigError(f"{group}._target_={target} cannot be imported ({why}); the module must be on "
                              "PYTHONPATH") from None
        try:
            signature = inspect.signature(built)
        except (TypeError, ValueError):
            continue  # a builtin without a signature: instantiate will say
        keys = [k for k in node if k not in NOT_ARGUMENTS]
        try:
            signature.bind(**{k: None for k in (*keys, *injected)})
        except TypeError as err:
            takes = ", ".join(p for p in signature.parameters if p not in injected) or "nothing"
            option = OmegaConf.select(cfg, f"hydra.runtime.choices.{group}", default=None) or node.get("name", "?")
            raise ConfigError(f"{group}={option} does not fit {target}: {err} (its {group} keys must be among: "
                              f"{takes})") from None


def build_objective(cfg: DictConfig):
    """The Pyro ELBO cfg.objective names (infer.objectives.make_objective); its other keys are its options.
    K (iwae) is the particle count in place of train.num_particles."""
    from infer.objectives import ObjectiveError, make_objective

    options = {k: v for k, v in OmegaConf.to_container(cfg.objective).items() if k not in ("name", "K", "steps")}
    particles = cfg.objective.K if "K" in cfg.objective else cfg.train.num_particles
    try:
        return make_objective(cfg.objective.name, particles, **options)
    except ObjectiveError as err:
        raise ConfigError(f"objective.{err}") from None


def exact_model_steps(cfg) -> int:
    """The model phase's step budget of objective=exact: objective.steps.<model> (measured per model)."""
    steps = OmegaConf.select(cfg, f"objective.steps.{cfg.model.name}")
    if steps is None:
        raise ConfigError(f"objective.steps.{cfg.model.name} is not set: objective=exact needs the model phase's step "
                          f"budget for model={cfg.model.name}")
    return steps


class Refused(ValueError):
    """Bad input found before training started: the run leaves no trace (a multirun job records it)."""


@contextlib.contextmanager
def refusals(cfg=None):
    """Bad input found while building a run (a ValueError, or hydra's InstantiationException around one) raised as
    Refused, in one line (a model or guide that fails on the data names cfg's settings away from their defaults)."""
    from cli.guards import explained

    try:
        yield
    except ValueError as err:
        raise Refused(explained(err, cfg)) from None
    except Exception as err:  # noqa: BLE001  e.g. hydra's InstantiationException around a ValueError
        cause = err.__cause__ or err.__context__
        if isinstance(cause, ValueError):
            raise Refused(explained(cause, cfg, str(cause).splitlines()[0])) from None
        raise


class Diverged(ValueError):
    """Training diverged: the last good checkpoint is kept, no normal-looking result is written."""
