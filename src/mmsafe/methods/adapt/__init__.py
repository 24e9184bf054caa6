"""Adapt a dual encoder to a downstream task, and measure what each method costs.

Objectives (``objective=``):

- ``classification``: fusion classification, image + text -> label (cross-entropy); quality is
  test accuracy.
- ``retrieval``: retrieval fine-tuning on (image, caption) pairs with the symmetric InfoNCE
  (CLIP) loss; quality is recall@1 on the test split, image -> text and text -> image, computed
  exactly as the ``performance`` check of ``mmsafe audit --task retrieval`` computes it.
- ``seqrec``: IISAN's own setting, sequential recommendation on recommendation data
  (``shapes-rec``): each method gives the item representation (the towers' image and title
  embeddings fused by a linear layer for ``full``/``lora``/``adapter``; the side networks over the
  item's cached hidden states, fused by the inter-modal side network, for ``iisan``/
  ``iisan-versa``; MOMEF's fused vector for ``momef`` and ``crossan``), a SASRec reads the
  histories, and every
  position predicts the next item with a softmax over the batch's unique items. Leave-one-out:
  quality is the test NDCG@10 under full ranking, history excluded
  (:mod:`~mmsafe.methods.adapt.seqrec`).

Methods (``method=``; a model's towers are found by :func:`tower_layers`: a model may name its
blocks with ``tower_blocks()``, as lit-mini does for its MobileNetV2 stages and MiniLM layers):

- ``full``: full fine-tuning of both towers and a linear head over the concatenated embeddings.
- ``lora``: LoRA (via ``peft``) on every linear and convolution layer of both towers; the towers'
  own weights are frozen.
- ``adapter``: Houlsby-style bottleneck adapters (``x + W_up act(W_down x)``, ``W_up`` zero at
  start) after every block of both towers; the towers' own weights are frozen.
- ``iisan``: decoupled side adaptation after IISAN (Fu et al., SIGIR 2024). The backbones are
  frozen and never see a gradient: an image and a text *intra-modal* side network and an
  *inter-modal* side network read the towers' per-layer hidden states (pooled to one vector per
  layer), with LayerDrop taps (one layer per group of layers, so towers of different depths are
  aligned as IISAN-Versa does) and learnable gates ``sigmoid(w / 0.1)``. Because the backbones
  are frozen and inputs are not augmented, the hidden states are computed **once** and cached
  (in memory, or as memory-mapped ``.npy`` files under a cache directory); training then never
  runs a backbone.
- ``iisan-versa``: IISAN for asymmetric towers after IISAN-Versa (Fu et al., TKDE,
  arXiv 2411.02992): group layer-dropping with an explicit number of groups per tower
  (:func:`group_taps`), per-block projections of both towers to the side width, and, when the
  towers get different numbers of taps, the surplus blocks of the longer tower run first,
  intra-modally only (:class:`IISANVersaHead`). Same cache and training as ``iisan``.
- ``momef``: per-modality side networks fused by a mixture of modality experts, after CROSSAN's
  MOMEF (Fu et al., arXiv 2504.10307). **A reconstruction**: the paper's fusion formula is not
  pinned down (:class:`MOMEFHead`). It takes any number of modalities; :func:`adapt` feeds it
  image and text, :func:`train_side_head` any cached per-modality features. Classification and
  seqrec.
- ``crossan``: CROSSAN (Fu et al., arXiv 2504.10307) over **any number of frozen towers, from
  one encoder or several** (``towers=``: the audited model's image and text plus, e.g.,
  lit-mini's: four towers; :mod:`~mmsafe.methods.adapt.crossan`). One decoupled intra side
  network per tower, a cross-modal side network that mixes the towers at each aligned tap,
  and MOMEF over the towers' and the cross-modal states (:class:`CROSSANHead`). **A
  reconstruction**: the paper gives no equations we could check and no code. Every encoder's
  hidden states are cached once; training runs no backbone. Classification and seqrec.

For ``retrieval``, ``full``/``lora``/``adapter`` train the towers (or their LoRA factors or
adapters) with the contrastive loss; ``iisan``/``iisan-versa`` train only the *intra-modal* side
networks plus a projection per modality (:class:`SideRetrievalHead`): the image side network
gives the image embedding, the text side network the text embedding, both from the cached
hidden states. The inter-modal side network fuses the two modalities into one item vector, which
a dual-encoder retrieval objective has no use for, so it is left out (as is MOMEF's fusion).

Every method is trained by the same loop (AdamW, the same batch order for a seed) and reports
training time per epoch, peak training memory (see :func:`mmsafe.methods.efficiency.peak_memory`;
also counted with the backbone's resident weights:
:attr:`AdaptReport.peak_memory_with_backbone_mib`),
trainable parameters and the objective's quality metric (:attr:`AdaptReport.accuracy`);
:func:`compare_methods` adds TPME across the compared methods. See ``docs/efficiency.md``.

Layout: :mod:`~mmsafe.methods.adapt.options` (methods, objectives, defaults),
:mod:`~mmsafe.methods.adapt.layers` (tower layers, pooling, taps, inputs),
:mod:`~mmsafe.methods.adapt.side` (the side networks and their feature cache),
:mod:`~mmsafe.methods.adapt.crossan` (CROSSAN's towers and their features),
:mod:`~mmsafe.methods.adapt.modules` (heads over an encoder, adapters),
:mod:`~mmsafe.methods.adapt.train` (the training loop, :func:`adapt`),
:mod:`~mmsafe.methods.adapt.seqrec` (the ``seqrec`` objective),
:mod:`~mmsafe.methods.adapt.report` (results, quality metrics),
:mod:`~mmsafe.methods.adapt.compare` (TPME, tables) and
:mod:`~mmsafe.methods.adapt.command` (``mmsafe adapt``). Import from the package.
"""

from mmsafe.methods.adapt.command import (
    AdaptError,
    adapt_command,
    check_supported,
    parse_methods,
    unsupported_methods,
)
from mmsafe.methods.adapt.compare import (
    compare_methods,
    comparison_table,
    default_methods,
    markdown_table,
    with_tpme,
)
from mmsafe.methods.adapt.crossan import (
    TowerFeatures,
    crossan_taps,
    parse_towers,
)
from mmsafe.methods.adapt.layers import (
    group_taps,
    labelled_rows,
    layerdrop_taps,
    lora_targets,
    pool_hidden,
    preprocess_all,
    tapped_features,
    tower_layers,
)
from mmsafe.methods.adapt.modules import (
    BottleneckAdapter,
    EncoderClassifier,
    RetrievalEncoder,
    add_adapters,
)
from mmsafe.methods.adapt.options import (
    DEFAULT_LR,
    MAX_SCALE,
    METHODS,
    MODALITIES,
    OBJECTIVES,
    RETRIEVAL_KS,
    RETRIEVAL_METHODS,
    SEQREC_KS,
    SEQREC_METHODS,
    SIDE_METHODS,
    TOWER_BLOCK_METHODS,
    Method,
    Objective,
)
from mmsafe.methods.adapt.report import (
    Adapted,
    AdaptReport,
    retrieval_metrics,
    zero_shot_retrieval,
)
from mmsafe.methods.adapt.seqrec import (
    ItemTowers,
    SeqRecAdapter,
    is_rec_data,
    ranking_scores,
    sequences_of,
)
from mmsafe.methods.adapt.side import (
    SANB,
    CROSSANHead,
    FeatureCache,
    Gate,
    IISANHead,
    IISANVersaHead,
    MOMEFHead,
    SideRetrievalHead,
    intra_modal,
    side_blocks,
    tap_projections,
)
from mmsafe.methods.adapt.train import adapt, train_side_head, weights_mib

__all__ = [
    "DEFAULT_LR",
    "MAX_SCALE",
    "METHODS",
    "MODALITIES",
    "OBJECTIVES",
    "RETRIEVAL_KS",
    "RETRIEVAL_METHODS",
    "SANB",
    "SEQREC_KS",
    "SEQREC_METHODS",
    "SIDE_METHODS",
    "TOWER_BLOCK_METHODS",
    "AdaptError",
    "AdaptReport",
    "Adapted",
    "CROSSANHead",
    "BottleneckAdapter",
    "EncoderClassifier",
    "FeatureCache",
    "Gate",
    "IISANHead",
    "IISANVersaHead",
    "ItemTowers",
    "MOMEFHead",
    "Method",
    "Objective",
    "RetrievalEncoder",
    "SeqRecAdapter",
    "SideRetrievalHead",
    "TowerFeatures",
    "adapt",
    "adapt_command",
    "add_adapters",
    "check_supported",
    "compare_methods",
    "comparison_table",
    "crossan_taps",
    "default_methods",
    "group_taps",
    "intra_modal",
    "is_rec_data",
    "labelled_rows",
    "layerdrop_taps",
    "lora_targets",
    "markdown_table",
    "parse_methods",
    "parse_towers",
    "pool_hidden",
    "preprocess_all",
    "ranking_scores",
    "retrieval_metrics",
    "sequences_of",
    "side_blocks",
    "tap_projections",
    "tapped_features",
    "tower_layers",
    "train_side_head",
    "unsupported_methods",
    "weights_mib",
    "with_tpme",
    "zero_shot_retrieval",
]
