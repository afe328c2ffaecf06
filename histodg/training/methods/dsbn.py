"""DSBN: domain-specific BatchNorm (MS-Net, Liu, Dou et al., IEEE TMI 2020), ERM's loss otherwise.

Every BatchNorm layer gets one slot of statistics and affine parameters per domain of the stage
(`model.domain_bn`); the convolutions are shared. One forward over the whole micro-batch, each
domain's patches normalised by its own slot. After every optimizer step the layers' shared slot
is set to the mixture of the domain slots: that is what a slide of an unknown domain is
predicted with (with its own statistics: `histodg predict` re-estimates them, as `--adapt bn`),
while a slide whose organ or scanner is one of the training domains uses that domain's slot.

Cross-task pretraining: a stage whose number of domains differs from the slots there are starts
every slot again from the shared one (the previous stage's mixture); a stage with as many
domains continues from the slots as they are. Models without BatchNorm are refused.
"""
from __future__ import annotations

from ... import HistodgError
from ...model.domain_bn import convert, domain, sync_shared
from .base import Method, seg_loss


class DSBN(Method):
    """ERM's loss, each domain through its own BatchNorm slot."""

    name = "dsbn"

    def __init__(self, model, num_domains, hparams=None, task=None, normalizer=None):
        super().__init__(model, num_domains, hparams, task, normalizer)
        try:
            convert(model, num_domains)
        except ValueError as exc:
            raise HistodgError("--method dsbn", f"{exc} (MiT / SegFormer encoders use LayerNorm): choose a "
                                                f"ResNet or EfficientNet encoder") from None
        sync_shared(model)

    def loss(self, batches):
        x, y, sizes = self.concat(batches)
        with domain(self.model, tuple(sizes)):
            logits = self.net(x)
        per_image = seg_loss(logits, y, self.task, reduction="none")
        loss = per_image.mean()
        return loss, {"loss": loss.detach(), "domain_losses": self.domain_losses(per_image, sizes)}

    def end_of_step(self) -> bool:
        sync_shared(self.model)
        return False

    def evaluation_route(self, index: int | None):
        """For validation: domain `index`'s slot (None: the shared one)."""
        return domain(self.model, index)

    def own_statistics(self, index: int | None) -> bool:
        """A held-out domain's slides are scored as predict runs a slide of an unknown domain: the
        shared slot with the slide's own statistics."""
        return index is None
