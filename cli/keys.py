"""The keys of a command line: every override must name a key of the composed config, and every group choice an
option in conf/<group>/; what is refused is named in one line, with the closest known keys.
"""
import difflib
import functools
import itertools
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from analysis.jobs import GroupChoices, options_in
from cli.state import ConfigError

CONF = Path(__file__).resolve().parent.parent / "conf"
GROUPS = ("data", "model", "guide", "objective", "optim", "experiment", "pair")
REQUIRED_GROUPS = ("data", "model", "guide", "objective", "optim")  # a run needs one option of each
# groups whose option follows from others (conf/config.yaml: `recipe: ${objective}_${model}`), never chosen by hand
DERIVED_GROUPS = {"recipe": "objective and model (conf/recipe/<objective>_<model>.yaml, where one exists)"}
# keys the config groups set themselves: what a group's option instantiates, and its name (the run dir's, metrics')
RESERVED = ("_target_", "_convert_", "_recursive_", "_partial_", "_args_")
# hydra.* keys that Hydra or its launcher sets as a job starts: an override was dropped without a word
# (hydra.runtime.output_dir=/tmp/x ran into outputs/..., exit 0)
HYDRA_SET_AT_START = ("hydra.runtime", "hydra.job.num", "hydra.job.id", "hydra.job.override_dirname")
# hydra.* keys whose conf/ values the run's files rely on: an override (set, added or deleted) is refused, naming why
HYDRA_FIXED = {
    "hydra.job.name": "it names the run's log, <run dir>/run.log (its stem is hydra.job.name): another name loses "
                      "run.log, a '/' in it crashed the run after its dir was made, and '..' wrote the log outside "
                      "the run's dir",
    "hydra.output_subdir": "run.py writes the run's .hydra/ files itself, once the run's dir is claimed (with a "
                           "value, Hydra wrote them first: over the .hydra/ files of the run in a sweep job's dir, "
                           "which the job was then refused to replace)",
}


# the directories a command line's --config-dir adds to the search path, after conf/ (as Hydra adds it: a file in
# conf/ wins over one of the same name there); set by cli.main before the preflight
EXTRA_DIRS: list = []


def search_dirs() -> list:
    """The config directories in Hydra's search order: conf/, then those of --config-dir."""
    return [CONF, *EXTRA_DIRS]


def group_options(group: str) -> list:
    return options_in(search_dirs(), group)


def option_file(group: str, option: str) -> Path:
    """The yaml Hydra composes for group=option: the first in the search path."""
    return next((f for f in (d / group / f"{option}.yaml" for d in search_dirs()) if f.is_file()),
                CONF / group / f"{option}.yaml")


def check_group_choices(argv) -> None:
    """Refuse `group=option` overrides whose option has no yaml in conf/<group>/, before Hydra composes."""
    chosen = {}
    for arg in argv:
        key, sep, value = arg.lstrip("+~").partition("=")
        group = key.split("@")[0]
        if group not in GROUPS:
            continue
        options = group_options(group)
        if "@" in key:  # Hydra: 'Did you mean to override model? ... use +model@foo=vae', then 'model appears more
            #             than once in the final defaults list'
            plus = "+" if group in ("experiment",) else ""
            raise ConfigError(f"{arg} is not allowed: {group} is chosen by its name alone, {plus}{group}=<one of "
                              f"{', '.join(options)}>; a package (@{key.partition('@')[2]}) would put a second "
                              f"{group} into the config")
        if group in REQUIRED_GROUPS and (arg.startswith("~") or value.strip() in ("null", "")):
            raise ConfigError(f"{arg}: {group} needs an option: {group} must be one of {', '.join(options)}")
        if not sep:
            continue
        if value.strip() in ("null", ""):  # an optional group (pair, experiment): Hydra takes no null choice
            raise ConfigError(f"{arg} is not allowed: {group} must be one of {', '.join(options)}; leave {group} out "
                              "to choose none")
        chosen[group] = value
        if value.strip()[:1] in ("[", "{"):  # split at its commas it would be named by a fragment ('model=[vae')
            raise ConfigError(f"{group}={value} is not allowed: {group} must be one option, one of "
                              f"{', '.join(options)} (a list or dict is none; sweep options with -m {group}=a,b)")
        choices = _sweep_values(arg) if "(" in value else value.split(",")  # choice(...), glob(...): Hydra's sweeps
        if not choices:
            raise ConfigError(f"{arg} is not allowed: it chooses no option of {group}, whose options are "
                              f"{', '.join(options)}")
        for choice in choices:
            if choice and choice != "null" and choice not in options:
                raise ConfigError(f"{group}={choice} is not allowed: {group} must be one of {', '.join(options)}")
    pair = chosen.get("pair")
    if pair and pair != "null" and "," not in pair:
        picks = pair_choices(pair)
        for group in ("model", "guide"):
            if group in chosen and chosen[group] != picks.get(group):
                raise ConfigError(f"pair={pair} chooses model={picks.get('model')} guide={picks.get('guide')}, "
                                  f"which {group}={chosen[group]} contradicts: give pair or model/guide, not both")


def _sweep_values(arg: str) -> list:
    """The values an override written in Hydra's sweep syntax (choice(a,b), glob(v*), range(0,3)) stands for, as
    strings; [the value] for one that sweeps nothing."""
    o = parse_overrides([arg])[0]
    if o.is_sweep_override() and not o.is_discrete_sweep():
        raise ConfigError(f"{arg} is not allowed: interval() draws numbers, and {o.key_or_group} must be one option, "
                          f"one of {', '.join(group_options(o.key_or_group.split('@')[0]))} (sweep options with -m "
                          f"{o.key_or_group}=a,b)")
    return list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.get_value_element_as_str()]


def pair_choices(pair: str) -> dict:
    """{'model': option, 'guide': option} that conf/pair/<pair>.yaml chooses (its `override /group: option`)."""
    node = OmegaConf.to_container(OmegaConf.load(option_file("pair", pair)))
    out = {}
    for entry in (node or {}).get("defaults", []):
        if isinstance(entry, dict):
            for k, v in entry.items():
                out[k.replace("override", "").strip().strip("/")] = v
    return out


def leaf_keys(node, prefix="") -> list:
    """Every key path of a (container) config: 'train', 'train.steps', ..."""
    out = []
    if isinstance(node, dict):
        for k, v in node.items():
            path = f"{prefix}{k}"
            out.append(path)
            out += leaf_keys(v, path + ".")
    return out


def value_keys(cfg: dict) -> list:
    """The key paths of a container config that hold a value, not a node: 'train.steps', not 'train'."""
    node = OmegaConf.create(cfg)
    return [k for k in leaf_keys(cfg) if not isinstance(OmegaConf.select(node, k), DictConfig)]


_ABSENT = object()


def has_key(cfg: dict, key: str) -> bool:
    """Whether a dotted key path exists in a container config (its value may be None)."""
    from analysis.sweep import select

    return select(cfg, key, _ABSENT) is not _ABSENT


def suggest(key: str, known: list) -> str:
    """', did you mean a, b?' from the known leaf keys closest to key (by path, or by its last part)."""
    last = key.split(".")[-1]
    close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
    close += [k for k in known if k.split(".")[-1] == last and k not in close]
    close += [k for k in known if k not in close and difflib.get_close_matches(last, [k.split(".")[-1]], cutoff=0.75)]
    return f"; did you mean {', '.join(close[:4])}?" if close else ""


def other_options_with(key: str) -> list:
    """'group=option' for every option of key's group whose yaml has key (e.g. model.depth -> ['model=dlgm'])."""
    group, _, rest = key.partition(".")
    if group not in GROUPS or not rest:
        return []
    found = []
    for option in group_options(group):
        node = OmegaConf.to_container(OmegaConf.load(option_file(group, option)))
        node = node.get(group, node) if isinstance(node, dict) else {}
        if has_key(node, rest):
            found.append(f"{group}={option}")
    return found


def compose_config(overrides, hydra_cfg=False):
    """conf/config.yaml composed with the overrides (with its hydra node when hydra_cfg), as Hydra composes it (by
    the running app's Hydra, inside a job: run.py's config is conf/config.yaml too)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        return compose("config", overrides=list(overrides), return_hydra_config=hydra_cfg)
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=_with_config_dirs(list(overrides)), return_hydra_config=hydra_cfg)


def _with_config_dirs(overrides: list) -> list:
    """The overrides with --config-dir's dirs on hydra.searchpath, where Hydra puts them: after conf/, before a
    hydra.searchpath of one's own."""
    if not EXTRA_DIRS:
        return overrides
    paths = [f"'file://{d}'" for d in EXTRA_DIRS]
    own = next((o for o in overrides if o.lstrip("+").startswith("hydra.searchpath=")), None)
    if own is None:
        return [*overrides, f"hydra.searchpath=[{','.join(paths)}]"]
    listed = own.partition("=")[2].strip()
    inner = listed[1:-1].strip() if listed.startswith("[") and listed.endswith("]") else listed
    return [f"hydra.searchpath=[{','.join(paths + ([inner] if inner else []))}]" if o is own else o
            for o in overrides]


def single_line(err) -> str:
    """str(err) on one line: every run of whitespace (newlines too) becomes one space, the ends stripped."""
    return " ".join(str(err).split())


def one_line(err) -> str:
    """A Hydra error's message on one line (its advice to append with '+' reworded: '+' is refused there too)."""
    text = single_line(err)
    if "To append to your config use +" in text:
        return text.replace("To append to your config use +", "(no '+' either: ") + ")"
    return text


def composition_error(err) -> ConfigError:
    """Hydra's failure to compose, as one line: an override that cannot be merged (a dict or null where the key takes
    a value) is named with what its key allows, where the table of allowed values knows it."""
    import re

    from cli.values import RULES

    text = one_line(err)
    merge = re.match(r"Error merging override (\+*)([^=]+)=(.*)", text)
    if merge:
        key, value = merge.group(2), merge.group(3)
        if key in RULES:
            return ConfigError(f"{key}={value} is not allowed: {key} must be {RULES[key][1]}")
        for section in ("launcher", "sweeper"):
            if key.startswith(f"hydra.{section}."):
                from importlib import import_module

                allowed = import_module(f"cli.{section}").allowed_setting(key.removeprefix(f"hydra.{section}."))
                if allowed is not None:
                    return ConfigError(f"{key}={value} is not allowed: {key} must be {allowed}")
        if key in ("hydra.run.dir", "hydra.sweep.dir"):
            return ConfigError(f"{key}={value} is not allowed: {key} must name a directory")
    return ConfigError(f"cannot compose the config: {text}")


class GroupOptions(GroupChoices):
    """GroupChoices of the command line's search path (conf/, then --config-dir's dirs); a glob() of a key that is no
    group is refused in one line (ConfigError)."""

    def __init__(self):
        super().__init__(search_dirs())

    def get_group_options(self, group_name, results_filter=None, config_name=None, overrides=None) -> list:
        if str(group_name).split("@")[0] not in GROUPS:
            raise ConfigError(f"{group_name}=glob(...) is not allowed: glob() sweeps the options of a config group "
                              f"({', '.join(GROUPS)}), and {group_name} is none; list its values (-m "
                              f"{group_name}=a,b) or sweep a range (range(0,3))")
        return super().get_group_options(group_name)


def parse_overrides(overrides):
    """Hydra's parsed overrides (a glob() sweep of a group's options reads them from GroupOptions); ConfigError (one
    line) for a command line Hydra cannot parse."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create(config_loader=GroupOptions())
    try:
        parsed = parser.parse_overrides(list(overrides))
    except Exception as err:  # noqa: BLE001  hydra's OverrideParseException
        for override in overrides:  # name the one that does not parse
            try:
                parser.parse_overrides([override])
            except Exception:  # noqa: BLE001
                key, eq, value = str(override).partition("=")
                if eq and (any(c in value for c in "=,[]{}():") or not value.isascii()):
                    hint = (f"; a value holding = , [ ] {{ }} ( ) : or a character outside ASCII (ü, ５) must be "
                            f"quoted as a whole: {key}='{value}'")
                else:
                    hint = ""
                raise ConfigError(f"{override} cannot be parsed ({one_line(err)}){hint}") from None
        raise ConfigError(f"cannot parse the command line: {one_line(err)}") from None
    for o in parsed:
        check_flat_sweep(o)
    return parsed


def check_flat_sweep(o) -> None:
    """Refuse, in one line naming the override, a sweep one of whose values is itself a sweep (seed=range(0,2),5:
    Hydra parses it, then fails with a message naming no key when it lists the values)."""
    from hydra.core.override_parser.types import ChoiceSweep, Sweep

    values = o._value.list if isinstance(o._value, ChoiceSweep) else []
    if any(isinstance(v, Sweep) for v in values):
        raise ConfigError(f"{o.input_line} is not allowed: a sweep's values are single values, and range(), "
                          f"choice() or interval() is none; sweep one of them alone ({o.key_or_group}=range(0,3)) or "
                          f"list the values ({o.key_or_group}=a,b,c)")


def check_swept_once(parsed) -> None:
    """Refuse, in one line, an optuna sweep that gives one key twice, once as one value and once swept: optuna kept
    train.steps=20 over a later train.steps=interval(10,20), whatever the order, and so searched nothing while its
    sweep said it had (exit 0). Hydra's basic sweeper keeps the last, as a single run does (a fixed value, then a
    sweep of it: -m data.n=3 data.n=1,3), and so does optuna for two sweeps of a key."""
    seen = {}
    for o in parsed:
        key = o.key_or_group
        if not key or o.is_delete():
            continue
        if key in seen and o.is_sweep_override() != seen[key].is_sweep_override():
            swept = o.input_line if o.is_sweep_override() else seen[key].input_line
            raise ConfigError(f"{key} is given twice in this optuna sweep, as one value and swept "
                              f"({seen[key].input_line}, {o.input_line}), and optuna keeps the value whatever the "
                              f"order, searching nothing: give {key} once (e.g. -m {swept})")
        seen[key] = o


def check_keys(overrides, multirun: bool) -> None:
    """Refuse, in one line, every override that names no key of the composed config (with or without '+'), a '+'
    on a key that exists, a deletion, and a sweep outside -m. Group choices that sweep are composed each."""
    parsed = parse_overrides(overrides)
    groups, plain = {}, []
    for o in parsed:
        key = o.get_key_element().lstrip("+~")
        if not o.key_or_group:
            raise ConfigError(f"{o.input_line!r} is not an override: an override is key=value (e.g. data.n=5)")
        if key.startswith("hydra") or o.key_or_group.startswith("hydra"):
            if o.key_or_group in HYDRA_FIXED:
                raise ConfigError(f"{o.input_line} is not allowed: {o.key_or_group} cannot be overridden: "
                                  f"{HYDRA_FIXED[o.key_or_group]}; leave it out")
            if any(o.key_or_group == k or o.key_or_group.startswith(k + ".") for k in HYDRA_SET_AT_START):
                choice = o.key_or_group.removeprefix("hydra.runtime.choices.")
                hint = (f"choose an option with {choice}=<option>" if choice != o.key_or_group else
                        "name a run's dir with hydra.run.dir (a sweep's with hydra.sweep.dir, its jobs' with "
                        "hydra.sweep.subdir)")
                raise ConfigError(f"{o.input_line} is not allowed: {o.key_or_group} is set by Hydra as each job "
                                  f"starts, and an override of it is dropped: {hint}")
            continue
        last, group = o.key_or_group.split(".")[-1], o.key_or_group.split(".")[0]
        if group.split("@")[0] in DERIVED_GROUPS:
            raise ConfigError(f"{o.input_line} is not allowed: {group} follows from {DERIVED_GROUPS[group]}; "
                              "override the keys it sets instead (e.g. model.prior_layers=3)")
        if last in RESERVED or (last == "name" and group in GROUPS and o.key_or_group.count(".") == 1):
            what = (f"a group option's name: choose another option instead ({group}=<one of "
                    f"{', '.join(group_options(group))}>)" if last == "name"
                    else "set by the config group's option (conf/): choose another option instead")
            raise ConfigError(f"{o.key_or_group} cannot be overridden: it is {what}")
        if o.key_or_group.split("@")[0] in GROUPS:
            if o.is_sweep_override() and not multirun:
                raise ConfigError(f"{o.input_line} sweeps {o.key_or_group} over several options; add -m to run a "
                                  "multirun")
            values = list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.get_value_element_as_str()]
            if o.key_or_group == "experiment" and len(values) > 1:  # each brings its own sweep (hydra.sweeper.params)
                raise ConfigError(f"{o.input_line} sweeps experiment over several options: an experiment brings its "
                                  "own sweep, which a sweep of experiments would drop (each job would run one "
                                  "default config); run one experiment per command, e.g. python run.py -m "
                                  f"+experiment={values[0]}")
            groups[("+" if o.is_add() else "") + o.key_or_group] = values
            continue
        if o.is_sweep_override() and not multirun:
            raise ConfigError(f"{o.input_line} sweeps {o.key_or_group} over several values; add -m to run a multirun")
        plain.append(o)
    combos = [dict(zip(groups, vs)) for vs in itertools.product(*groups.values())] or [{}]
    for combo in combos[:64]:
        base_overrides = [f"{k}={v}" for k, v in combo.items()]
        try:
            base = OmegaConf.to_container(compose_config(base_overrides, hydra_cfg=True))
        except Exception as err:  # noqa: BLE001  hydra's composition errors
            raise composition_error(err) from None
        sweep = (base.get("hydra", {}).get("sweeper", {}) or {}).get("params") or {}
        base.pop("hydra", None)
        known = functools.partial(value_keys, base)  # only a refusal's suggestions need them
        where = " for " + ", ".join(f"{k.lstrip('+')}={v}" for k, v in combo.items()) if combo else ""
        for o in plain:
            key = o.key_or_group
            if o.is_delete():
                raise ConfigError(f"~{key}: deleting config keys is not allowed; set {key} to a value instead")
            if not has_key(base, key):
                elsewhere = other_options_with(key)
                hint = f"; it is a key of {', '.join(elsewhere)}" if elsewhere else suggest(key, known())
                raise ConfigError(f"{key} is not a config key{where}{hint}")
            if (o.is_add() and not o.is_force_add()) and has_key(base, key):
                raise ConfigError(f"+{key}: {key} already exists; override it without '+': {key}=...")
        given = {k.lstrip("+") for k in groups} | {o.key_or_group for o in plain}
        unset = [k for k in sweep if k not in given]  # a single run may set every swept key itself (a replica's)
        if unset and not multirun:
            raise ConfigError(f"{where.replace(' for ', '', 1) or 'the config'} sweeps {', '.join(unset)}: add -m to "
                              f"run its sweep (python run.py -m ...), or set {', '.join(unset)} for a single run")
        for key in sweep:  # an experiment's own sweep keys
            if key.split("@")[0] not in GROUPS and not key.startswith("hydra") and not has_key(base, key):
                raise ConfigError(f"{key} (swept by the experiment) is not a config key{suggest(key, known())}")
