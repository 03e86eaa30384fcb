"""Self-supervised local learners (SimCLR, BYOL) with a few-shot classifier stage.

A client learns a representation from its images alone, two augmented views of each
(the loop's weak and strong views, an asymmetric pair as in BYOL): SimCLR (Chen et
al., ICML 2020) pulls the two views' projections together against every other image
of the batch with the NT-Xent loss; BYOL (Grill et al., NeurIPS 2020) has an online
network (encoder, projector, predictor) predict a target network's projection of the
other view, the target an EMA of the online encoder and projector, never trained by
gradients. The losses, heads and EMA step are the `lightly` library's.

FedAffect (Shome and Kar, "FedAffect: Few-shot federated learning for facial
expression recognition", ICCV Workshops 2021) trains the feature extractor this way on
the unlabeled faces and, separately, the classifier on the few labeled ones. The
round's stage (`payload.config["stage"]`) says which: "ssl" (images only: the learner
is handed no labels at all), "fewshot" (the classifier on the labeled images, the
encoder frozen unless `finetune_encoder`) or "both" (the two losses in every step).

The encoder is the model itself (its pre-logits features, timm's
`forward_head(pre_logits=True)`), so the classifier that is evaluated and exported sits
on exactly the encoder that was learned. The projector and predictor travel beside the
model's arrays under "ssl_projector." and "ssl_predictor."; which arrays stay on the
client is the algorithm's split (`personal`), kept under "personal/". BYOL's target
network is the client's own ("target/"), and so is FedEMA's previous online network
("fedema/", see `fedssl.ssl.selfsup`).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from fedssl.config.schema import TrainConfig
from fedssl.extras import require
from fedssl.learners.base import Batch, ClientContext, FederatedLearner, batch_size
from fedssl.learners.personal import PERSONAL, prefixed, unprefixed
from fedssl.learners.supervised import build_optimizer
from fedssl.messages import Arrays, Payload
from fedssl.models.split import head_parameter_names
from fedssl.ssl.selfsup import autoscaled_lambda, divergence, ema_blend, fedema_rate

PROJECTOR = "ssl_projector."  # the projection head's arrays, beside the model's
PREDICTOR = "ssl_predictor."  # BYOL's prediction head's
HEADS = (PROJECTOR, PREDICTOR)
TARGET = "target/"  # BYOL's target network, in the client's kept state
FEDEMA = "fedema/"  # FedEMA: the client's online network at the end of its last round
FEDEMA_LAMBDA = "fedema_lambda"  # FedEMA: the client's autoscaled lambda
STAGES = ("ssl", "fewshot", "both")
METHODS = ("simclr", "byol")


def lightly_modules():
    """The `lightly` pieces, or `MissingExtra` naming the extra that installs them."""
    require("lightly", "ssl")
    from lightly.loss import NegativeCosineSimilarity, NTXentLoss
    from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead, SimCLRProjectionHead
    from lightly.models.utils import update_momentum
    from lightly.utils.scheduler import cosine_schedule
    return dict(NTXentLoss=NTXentLoss, NegativeCosineSimilarity=NegativeCosineSimilarity,
                SimCLRProjectionHead=SimCLRProjectionHead, BYOLProjectionHead=BYOLProjectionHead,
                BYOLPredictionHead=BYOLPredictionHead, update_momentum=update_momentum, cosine_schedule=cosine_schedule)


def encoder_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model's pre-logits features: what the classifier reads."""
    return model.forward_head(model.forward_features(x), pre_logits=True)


class SelfSupervisedLearner(FederatedLearner):
    """SimCLR or BYOL on a client's images, and the few-shot classifier on its labels.

    Args:
        model: the classifier whose pre-logits features are the encoder.
        method: "simclr" or "byol".
        proj_dim, hidden_dim: the heads' output and hidden widths.
        temperature: NT-Xent's temperature (SimCLR).
        target_momentum: BYOL's base EMA rate of the target, raised to 1 over a
            round's steps by a cosine schedule (BYOL's tau schedule).
        finetune_encoder: in the few-shot stage, train the encoder with the classifier.
        fedema: FedEMA's divergence-aware update of the local online network;
            `fedema_lambda` > 0 fixes lambda, else the autoscaler sets it from `fedema_tau`.
        fewshot_steps: SGD steps of a few-shot round (0: the recipe's budget).
    """

    uses_unlabeled = True

    def __init__(self, model: nn.Module, train_cfg: TrainConfig, method: str = "byol", proj_dim: int = 64,
                 hidden_dim: int = 256, temperature: float = 0.5, target_momentum: float = 0.99,
                 finetune_encoder: bool = False, fedema: bool = False, fedema_lambda: float = 0.0,
                 fedema_tau: float = 0.7, fewshot_steps: int = 0):
        super().__init__(model)
        lightly = lightly_modules()
        self.train_cfg, self.method = train_cfg, method
        self.finetune_encoder, self.target_momentum = finetune_encoder, target_momentum
        self.fedema, self.fedema_lambda, self.fedema_tau = fedema, fedema_lambda, fedema_tau
        self.fewshot_steps = fewshot_steps
        self._update_momentum, self._cosine_schedule = lightly["update_momentum"], lightly["cosine_schedule"]
        features = getattr(model, "head_hidden_size", None) or model.num_features
        if method == "simclr":
            self.projector = lightly["SimCLRProjectionHead"](features, hidden_dim, proj_dim)
            self.predictor = None
            self.ssl_loss = lightly["NTXentLoss"](temperature=temperature)
        else:
            self.projector = lightly["BYOLProjectionHead"](features, hidden_dim, proj_dim)
            self.predictor = lightly["BYOLPredictionHead"](proj_dim, hidden_dim, proj_dim)
            self.ssl_loss = lightly["NegativeCosineSimilarity"]()
        # BYOL's target network: the client's own, never trained by gradients.
        self.target_model = copy.deepcopy(model).requires_grad_(False) if method == "byol" else None
        self.target_projector = copy.deepcopy(self.projector).requires_grad_(False) if method == "byol" else None
        self.classifier_names = set(head_parameter_names(model))
        self.personal: list[str] = []  # set by the algorithm: the arrays that stay on the client
        self.stage = "ssl"
        self.kept: dict[str, torch.Tensor] = {}
        self.steps_taken, self.total_steps = 0, 1
        self.mu: float | None = None
        self.lam: float | None = None

    # -- arrays: the model's and the heads', by name ------------------------------------------

    def heads(self) -> dict[str, nn.Module]:
        return {PROJECTOR: self.projector} | ({PREDICTOR: self.predictor} if self.predictor is not None else {})

    def views(self) -> dict[str, torch.Tensor]:
        """Every array the client trains, by name: the model's state_dict and the heads'."""
        views = dict(self.model.state_dict())
        for prefix, head in self.heads().items():
            views |= prefixed(head.state_dict(), prefix)
        return views

    def target_views(self) -> dict[str, torch.Tensor]:
        """BYOL's target network under the online names it follows (model and projector)."""
        return dict(self.target_model.state_dict()) | prefixed(self.target_projector.state_dict(), PROJECTOR)

    def load_arrays(self, arrays: Arrays) -> None:
        views = self.views()
        with torch.no_grad():
            for name, value in arrays.items():
                views[name].copy_(value)

    def arrays(self, names: list[str]) -> Arrays:
        views = self.views()
        return {name: views[name].detach().clone() for name in names}

    def encoder_names(self) -> list[str]:
        """The floating-point arrays self-supervision trains: the model without its
        classifier, and the projector (FedEMA's divergence is measured on these)."""
        return [n for n, v in self.views().items() if v.is_floating_point() and n not in self.classifier_names
                and not n.startswith(PREDICTOR)]

    def online_names(self) -> list[str]:
        """What FedEMA moves toward the global model: the encoder and the predictor."""
        return self.encoder_names() + [n for n, v in self.views().items()
                                       if n.startswith(PREDICTOR) and v.is_floating_point()]

    # -- the round ------------------------------------------------------------------------------

    def inputs(self, payload: Payload) -> tuple[bool, bool]:
        stage = self.stage_of(payload)
        return stage != "ssl", stage != "fewshot"

    @staticmethod
    def stage_of(payload: Payload) -> str:
        stage = str(payload.config.get("stage", "ssl"))
        if stage not in STAGES:
            raise ValueError(f"payload stage {stage!r} is not one of {STAGES}")
        return stage

    def start_round(self, payload: Payload, context: ClientContext) -> None:
        """The global weights are loaded: restore the personal arrays, apply FedEMA's
        update from the client's last online network, and set up BYOL's target."""
        self.stage = self.stage_of(payload)
        self.kept = dict(context.state)  # passed on: a few-shot round leaves the SSL state as it was
        self.load_arrays({n: v for n, v in unprefixed(context.state, PERSONAL).items() if n in self.personal})
        self.mu, self.lam, self.steps_taken = None, None, 0
        if self.stage == "fewshot":
            return
        if self.fedema:
            self.fedema_update(unprefixed(context.state, FEDEMA), context.state.get(FEDEMA_LAMBDA))
        if self.target_model is not None:
            target = unprefixed(context.state, TARGET) or self.views()  # a first-time client: the online network
            views = self.target_views()
            with torch.no_grad():
                for name, view in views.items():
                    view.copy_(target[name])

    def fedema_update(self, previous: Arrays, kept_lambda: torch.Tensor | None) -> None:
        """W_k <- mu W_k + (1 - mu) W_g with mu = min(lambda ||W_g - W_k||, 1) (Zhuang
        et al., ICLR 2022); a first-time client starts from the global model."""
        if not previous:
            return
        received = self.arrays(self.online_names())
        gap = divergence(received, previous, self.encoder_names())
        lam = float(kept_lambda) if kept_lambda is not None else (
            self.fedema_lambda if self.fedema_lambda > 0 else autoscaled_lambda(self.fedema_tau, gap))
        if lam is None:
            return
        self.lam, self.mu = lam, fedema_rate(gap, lam)
        self.load_arrays({n: ema_blend(previous[n], received[n], self.mu) for n in received})

    def round_steps(self, steps: int) -> int:
        """The recipe's budget, or in a few-shot round `fewshot_steps` where set."""
        if self.stage == "fewshot" and self.fewshot_steps > 0:
            steps = self.fewshot_steps
        self.total_steps = steps
        return steps

    def momentum(self) -> float:
        """BYOL's target rate at this step: `target_momentum` raised to 1 over the round (cosine)."""
        return self._cosine_schedule(self.steps_taken, self.total_steps, self.target_momentum, 1.0)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        online = list(self.model.parameters()) + [p for head in self.heads().values() for p in head.parameters()]
        return build_optimizer(online, self.train_cfg)

    def train(self, mode: bool = True) -> SelfSupervisedLearner:
        """The target network always predicts in eval mode, as a fixed teacher."""
        super().train(mode)
        for module in (self.target_model, self.target_projector):
            if module is not None:
                module.eval()
        return self

    def self_supervised_loss(self, view0: torch.Tensor, view1: torch.Tensor) -> torch.Tensor:
        n = len(view0)
        z = self.projector(encoder_features(self.model, torch.cat([view0, view1])))
        if self.predictor is None:  # SimCLR: NT-Xent between the two views' projections
            return self.ssl_loss(z[:n], z[n:])
        # BYOL: the target moves first (the EMA step of the weights as they stand), then
        # each view's prediction chases the target's projection of the other view.
        self._update_momentum(self.model, self.target_model, self.momentum())
        self._update_momentum(self.projector, self.target_projector, self.momentum())
        p = self.predictor(z)
        with torch.no_grad():
            t = self.target_projector(encoder_features(self.target_model, torch.cat([view1, view0])))
        return self.ssl_loss(p, t)

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        if self.finetune_encoder:
            return self.model(x)
        with torch.no_grad():
            features = encoder_features(self.model, x)
        return self.model.get_classifier()(features)

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        loss = None
        # BatchNorm in the heads needs two images; a pass's last batch may hold one.
        if self.stage != "fewshot" and "u_weak" in batch and len(batch["u_weak"]) > 1:
            loss = self.self_supervised_loss(batch["u_weak"], batch["u_strong"])
        if self.stage != "ssl" and "x" in batch:
            supervised = F.cross_entropy(self.classify(batch["x"]), batch["y"])
            loss = supervised if loss is None else loss + supervised
        self.steps_taken += 1
        if loss is None:  # nothing to learn from in this batch: a step of no gradient
            loss = torch.zeros((), device=self.device, requires_grad=True)
        self.log("train_loss", loss, prog_bar=True, batch_size=batch_size(batch))
        if self.mu is not None:
            self.log("fedema_mu", self.mu, batch_size=batch_size(batch))
        return loss

    def end_round(self) -> dict[str, torch.Tensor]:
        kept = self.kept | prefixed(self.arrays(self.personal), PERSONAL)
        if self.stage == "fewshot":
            return kept
        if self.fedema:
            kept |= prefixed(self.arrays(self.online_names()), FEDEMA)
            if self.lam is not None:
                kept[FEDEMA_LAMBDA] = torch.tensor(self.lam, dtype=torch.float64)
        if self.target_model is not None:
            kept |= prefixed({n: v.detach().clone() for n, v in self.target_views().items()}, TARGET)
        return kept
