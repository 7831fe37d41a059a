"""TensorBoard extras: image grids, the run's hyperparameters (hparams plugin), the custom-scalars layout."""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .metrics import custom_scalars_layout
from .models import SBN

#: one chart per charted metric family (sbn_train.metrics); every run is one line in it. Tags are regexes.
LAYOUT = custom_scalars_layout()


def image_grid(x: Tensor, shape: tuple[int, int]) -> Tensor:
    """``[N, H*W]`` intensities in [0, 1] -> one ``[3, H', W']`` grid image, rows of ceil(sqrt(N)) images."""
    from torchvision.utils import make_grid
    n = x.shape[0]
    imgs = x.detach().float().cpu().clamp(0, 1).view(n, 1, *shape)
    return make_grid(imgs, nrow=math.ceil(math.sqrt(n)), padding=1, pad_value=0.5)


@torch.no_grad()
def log_images(writer, model: SBN, x: Tensor, shape: tuple[int, int] | None, step: int, seed: int,
               with_data: bool = False) -> None:
    """``images/samples`` (means of p(x | z_1) for z ~ p), ``images/reconstructions`` (means of p(x | z_1) for
    z ~ q(. | x)) and, if ``with_data``, ``images/data`` (the binarized ``x``). Nothing for non-image data."""
    if shape is None or x.shape[0] == 0:
        return
    gen = torch.Generator(device=x.device).manual_seed(seed)
    x = x.to(model.prior_logits.dtype)
    if with_data:
        writer.add_image("images/data", image_grid(x, shape), step)
    means, _ = model.sample_p(x.shape[0], gen)
    writer.add_image("images/samples", image_grid(means, shape), step)
    zs = model.sample_q(x, model.draw_uniforms(x.shape[0], gen, x.device, x.dtype))
    writer.add_image("images/reconstructions", image_grid(torch.sigmoid(model.p_nets[0](zs[0])), shape), step)


def log_layout(writer, **logged) -> None:
    """The custom-scalars layout of the charts this run fills; ``logged`` are the arguments of
    :func:`sbn_train.metrics.custom_scalars_layout` (``n_layers``, ``views``, ``iwae``; none: every chart).
    TensorBoard merges the layouts of the runs of a sweep folder (identical charts once)."""
    writer.add_custom_scalars(custom_scalars_layout(**logged) if logged else LAYOUT)


#: the hyperparameters TensorBoard's HParams table shows as columns; it shows five at first (the others can
#: be ticked on), taking those marked ``differs`` first, so these are marked (whether or not they differ)
KEY_HPARAMS = ("dataset", "estimator", "lr", "model", "seed")


def log_hparams(writer, hparams: dict[str, Any], metric_tags: list[str]) -> None:
    """The run's hyperparameters for the hparams plugin. Its metrics are existing scalar tags of this run
    (e.g. ``test/elbo``): the plugin shows their last value, so nothing is logged twice. The table's first
    columns are :data:`KEY_HPARAMS` and the metrics in the order given (it shows five of each at first)."""
    from tensorboard.plugins.hparams import plugin_data_pb2
    from torch.utils.tensorboard.summary import hparams as hparams_summary
    # integers (seed, batch size, steps) as text: the plugin shows numbers with four decimals ("0.0000")
    clean = {k: v if isinstance(v, (float, str, bool)) else str(v) for k, v in hparams.items()}
    exp, ssi, sei = hparams_summary(clean, {tag: 0.0 for tag in metric_tags})
    plugin = exp.value[0].metadata.plugin_data
    data = plugin_data_pb2.HParamsPluginData.FromString(plugin.content)
    for info in data.experiment.hparam_infos:
        info.differs = info.name in KEY_HPARAMS
    plugin.content = data.SerializeToString()
    fw = writer._get_file_writer()
    for summary in (exp, ssi, sei):
        fw.add_summary(summary)
