"""`credence-train --method ...`: each posterior method's options, model construction and
training, as a `Method` class; `training.methods.METHODS` is the table the CLI reads.

A method declares its own flags and defaults, adds its keys to the architecture's config, and
trains the model that (method, architecture) builds (`training.build`). The shared pieces
(data loading, standardization, the validation split, evaluation, the checkpoint) stay in
`training.train` and `training.cli`, so a new method is one class here and one entry in the
table, with no change to the CLI. Flags that several methods share (--prior, the SG-MCMC
schedule) are declared once with default None; each method substitutes its own default, so
`--prior` means the same thing whichever method it is given to.
"""

from __future__ import annotations

import argparse
import contextlib
from typing import Any, ClassVar

from training.architectures import arch_name
from training.build import model_type
from training.data import Dataset
from training.distributed import SINGLE, Spread
from training.fit import FitOptions, FitResult, fit
from training.model import PosteriorModel
from training.posteriors.fit_ensemble import fit_ensemble
from training.posteriors.fit_laplace import fit_laplace
from training.posteriors.fit_sgmcmc import SGMCMCSettings, fit_sgmcmc
from training.posteriors.fit_variational import fit_variational
from training.posteriors.laplace import STRUCTURES
from training.posteriors.variational import ESTIMATORS, VariationalNet
from training.priors import DEFAULT_PRIOR, parse_prior


class Method:
    """Base class: declared options (with defaults), then build + train.

    Option flags default to None, which means "the method's default": several methods can
    then share a flag (declared once) and each substitutes its own default.
    """

    name: ClassVar[str]
    help: ClassVar[str]
    defaults: ClassVar[dict[str, Any]] = {}

    @classmethod
    def add_arguments(cls, group: argparse._ArgumentGroup) -> None:
        """Declare the method's flags (default None); their dests are keys of `defaults`."""

    def __init__(self, **options: Any):
        options = {k: v for k, v in options.items() if v is not None}
        unknown = set(options) - set(self.defaults)
        if unknown:
            raise ValueError(f"{self.name} takes no options {sorted(unknown)}")
        self.options = {**self.defaults, **options}

    def build(self, arch: dict, likelihood: dict, stats: dict) -> PosteriorModel:
        """The model of this method on the architecture `arch` (training.architectures)."""
        arch = {**arch, **self.arch_options(arch)}
        return model_type(self.name, arch)(arch, likelihood, stats)

    def arch_options(self, arch: dict) -> dict[str, Any]:
        """What the method adds to the architecture config (its model's arch keys)."""
        return {}

    def check_spread(self, processes: int) -> None:
        """Raise unless training can be spread over `processes` processes (torchrun)."""
        if processes > 1:
            raise ValueError(
                f"--method {self.name} fits one network, which cannot be split across "
                f"{processes} processes; run it in one process (without torchrun, or with "
                "--nproc-per-node 1). ensemble, sgld and sghmc spread their members or chains"
            )

    def train(
        self,
        model: PosteriorModel,
        train: Dataset,
        val: Dataset | None,
        options: FitOptions,
        spread: Spread = SINGLE,
    ) -> FitResult:
        """Gradient training on NLL + penalty; methods with other samplers override this.
        `spread`: this process's place in a torchrun job (`check_spread` allowed it)."""
        return fit(model, train, val, options)


class MCDropout(Method):
    """MC dropout (Gal & Ghahramani 2016): dropout stays on at prediction time."""

    name = "mc_dropout"
    help = "MC dropout: dropout kept on at prediction time (Gal & Ghahramani 2016)"
    defaults: ClassVar[dict[str, Any]] = {
        "dropout": 0.05,
        "prior_lengthscale": 1e-2,
        "input_dropout": False,
    }

    @classmethod
    def add_arguments(cls, group: argparse._ArgumentGroup) -> None:
        d = cls.defaults
        group.add_argument(
            "--dropout",
            type=float,
            metavar="P",
            help=f"dropout rate of the hidden layers (default: {d['dropout']})",
        )
        group.add_argument(
            "--prior-lengthscale",
            type=float,
            metavar="L",
            help="prior length-scale l; the weight decay is l^2 (1-p) / 2N "
            f"(default: {d['prior_lengthscale']})",
        )
        group.add_argument(
            "--input-dropout",
            action=argparse.BooleanOptionalAction,
            help="also drop input features, as Gal's UCI code does (default: off)",
        )

    def __init__(self, **options: Any):
        super().__init__(**options)
        if not 0 <= self.options["dropout"] < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.options['dropout']}")
        if self.options["prior_lengthscale"] < 0:
            raise ValueError("the prior length-scale must be >= 0")

    def arch_options(self, arch: dict) -> dict[str, Any]:
        keys = ("dropout", "input_dropout", "prior_lengthscale")
        return {key: self.options[key] for key in keys}


def _declare(group: argparse._ArgumentGroup, flag: str, **kwargs: Any) -> None:
    """Add `flag` unless another method already declared it (same meaning, default None)."""
    with contextlib.suppress(argparse.ArgumentError):
        group.add_argument(flag, default=None, **kwargs)


def _declare_prior(group: argparse._ArgumentGroup) -> None:
    _declare(
        group,
        "--prior",
        metavar="SPEC",
        help=f"weight prior: normal:SIGMA or mixture:PI,SIGMA1,SIGMA2 (default: {DEFAULT_PRIOR})",
    )


class _PosteriorMethod(Method):
    """Options left at None (not given on the command line) take the method's default."""

    def __init__(self, **options: Any):
        super().__init__(**{k: v for k, v in options.items() if v is not None})
        if "prior" in self.options:
            self.options["prior"] = parse_prior(self.options["prior"]).spec


class Variational(_PosteriorMethod):
    name = "variational"
    help = "mean-field variational inference (Bayes by Backprop)"
    defaults: ClassVar[dict[str, Any]] = {
        "prior": DEFAULT_PRIOR,
        "estimator": "local",
        "moped_delta": None,
    }

    @classmethod
    def add_arguments(cls, group: argparse._ArgumentGroup) -> None:
        _declare_prior(group)
        _declare(
            group,
            "--estimator",
            choices=ESTIMATORS,
            help="variational gradient estimator: local reparameterization or flipout",
        )
        _declare(
            group,
            "--moped-delta",
            type=float,
            metavar="D",
            help="MOPED: start from a deterministic fit with scales D |w| (default: off)",
        )

    def arch_options(self, arch: dict) -> dict[str, Any]:
        if model_type(self.name, arch) is VariationalNet:
            return {"prior": self.options["prior"], "estimator": self.options["estimator"]}
        if self.options["moped_delta"] is not None:
            raise ValueError(f"MOPED starts from a dense network, not a {arch_name(arch)}")
        return {"prior": self.options["prior"]}

    def train(
        self,
        model: PosteriorModel,
        train: Dataset,
        val: Dataset | None,
        options: FitOptions,
        spread: Spread = SINGLE,
    ) -> FitResult:
        return fit_variational(model, train, val, options, self.options["moped_delta"])


def _check_units(flag: str, units: int, processes: int) -> None:
    """Each process trains a block of members (or chains) of its own: at least one."""
    if units < processes:
        raise ValueError(
            f"{flag} {units} cannot be spread over {processes} processes: each trains at "
            f"least one; use {flag} >= {processes} or fewer processes"
        )


class Ensemble(_PosteriorMethod):
    name = "ensemble"
    help = "deep ensemble (use --noise heteroscedastic for the paper's Gaussian heads)"
    defaults: ClassVar[dict[str, Any]] = {"prior": DEFAULT_PRIOR, "members": 5}

    @classmethod
    def add_arguments(cls, group: argparse._ArgumentGroup) -> None:
        _declare_prior(group)
        _declare(group, "--members", type=int, metavar="M", help="ensemble size (default: 5)")

    def arch_options(self, arch: dict) -> dict[str, Any]:
        return {"members": self.options["members"], "prior": self.options["prior"]}

    def check_spread(self, processes: int) -> None:
        _check_units("--members", self.options["members"], processes)

    def train(
        self,
        model: PosteriorModel,
        train: Dataset,
        val: Dataset | None,
        options: FitOptions,
        spread: Spread = SINGLE,
    ) -> FitResult:
        return fit_ensemble(model, train, val, options, spread)


_SGMCMC_FLAGS = {  # setting -> (type, help)
    "chains": (int, "parallel chains"),
    "warmup_epochs": (int, "Adam epochs that start each chain"),
    "cycles": (int, "cyclical step-size cycles"),
    "burnin_cycles": (int, "cycles discarded as burn-in"),
    "epochs_per_cycle": (int, "epochs per cycle"),
    "samples_per_cycle": (int, "samples kept per cycle and chain"),
    "exploration": (float, "noise-free fraction of each cycle"),
    "step_size": (float, "peak per-example step size"),
    "friction": (float, "SGHMC friction"),
    "temperature": (float, "posterior temperature"),
}


class _SGMCMC(_PosteriorMethod):
    sampler: ClassVar[str]
    step_size: ClassVar[float]

    @classmethod
    def add_arguments(cls, group: argparse._ArgumentGroup) -> None:
        _declare_prior(group)
        for setting, (kind, text) in _SGMCMC_FLAGS.items():
            default = getattr(SGMCMCSettings, setting)
            flag = "--" + setting.replace("_", "-")
            _declare(group, flag, type=kind, help=f"SG-MCMC: {text} (default: {default})")

    def __init__(self, **options: Any):
        super().__init__(**options)
        fields = {k: self.options[k] for k in _SGMCMC_FLAGS}
        self.settings = SGMCMCSettings(sampler=self.sampler, **fields)

    def arch_options(self, arch: dict) -> dict[str, Any]:
        return {"members": self.settings.num_samples, "prior": self.options["prior"]}

    def check_spread(self, processes: int) -> None:
        _check_units("--chains", self.settings.chains, processes)

    def train(
        self,
        model: PosteriorModel,
        train: Dataset,
        val: Dataset | None,
        options: FitOptions,
        spread: Spread = SINGLE,
    ) -> FitResult:
        return fit_sgmcmc(model, train, val, options, self.settings, spread)


def _sgmcmc_defaults(step_size: float) -> dict[str, Any]:
    base = {k: getattr(SGMCMCSettings, k) for k in _SGMCMC_FLAGS}
    return {"prior": DEFAULT_PRIOR, **base, "step_size": step_size}


class SGLD(_SGMCMC):
    name = sampler = "sgld"
    help = "stochastic-gradient Langevin dynamics, cyclical step size"
    defaults: ClassVar[dict[str, Any]] = _sgmcmc_defaults(1e-3)


class SGHMC(_SGMCMC):
    name = sampler = "sghmc"
    help = "stochastic-gradient Hamiltonian Monte Carlo, cyclical step size"
    defaults: ClassVar[dict[str, Any]] = _sgmcmc_defaults(1e-4)


class Laplace(_PosteriorMethod):
    name = "laplace"
    help = "last-layer Laplace approximation of a MAP network"
    defaults: ClassVar[dict[str, Any]] = {
        "prior": DEFAULT_PRIOR,
        "structure": "kron",
        "prior_precision": None,
    }

    @classmethod
    def add_arguments(cls, group: argparse._ArgumentGroup) -> None:
        _declare_prior(group)
        _declare(group, "--structure", choices=STRUCTURES, help="Laplace: Hessian structure")
        _declare(
            group,
            "--prior-precision",
            type=float,
            metavar="LAMBDA",
            help="Laplace: last-layer prior precision (default: tuned by the evidence)",
        )

    def arch_options(self, arch: dict) -> dict[str, Any]:
        return {"structure": self.options["structure"], "prior": self.options["prior"]}

    def train(
        self,
        model: PosteriorModel,
        train: Dataset,
        val: Dataset | None,
        options: FitOptions,
        spread: Spread = SINGLE,
    ) -> FitResult:
        return fit_laplace(model, train, val, options, self.options["prior_precision"])
