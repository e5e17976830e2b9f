"""What the orthogonal kinds (OFT, BOFT, HRA) share: the length they rotate and the sites PEFT lets them adapt."""

from __future__ import annotations

from ..sites import Site


def rotated_dim(site: Site) -> int:
    """The length rotated: in_features, in_channels * k * k, or the embedding dimension."""
    if site.op == "conv2d":
        _, inp, kh, kw = site.weight_shape
        return inp * kh * kw
    return site.weight_shape[1]


def orthogonal_site_problem(site: Site, kind: str, undilated: bool = False) -> str | None:
    """PEFT's limits beyond Conv1D (the kinds set ``conv1d = False``): convs ungrouped with a square kernel (OFT:
    undilated too)."""
    if site.op == "conv2d":
        c = site.conv_args
        kh, kw = site.weight_shape[2:]
        dilated = undilated and c["dilation"] not in (1, (1, 1), [1, 1])
        if c["groups"] != 1 or dilated or kh != kw:
            what = "an ungrouped, undilated conv" if undilated else "an ungrouped conv"
            return f"{kind} needs {what} with a square kernel, as PEFT does ({site.describe()})"
    return None
