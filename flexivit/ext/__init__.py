"""The option families: each technique from the source documents as an option that works at every patch size.

Layer files (a model option registered with ``flexivit.model.options.register``, or a training-time piece)
import only ``model/`` and ``data/``; the command drivers (``compress``, ``evolve``, ``fewshot``,
``recalibrate``) sit above the trainer. ``OPTION_MODULES`` is what the registry imports when a config first
names an option field; options of other packages come through the ``flexivit.options`` entry points.
"""

OPTION_MODULES = (
    "flexivit.ext.scale_invariant",
    "flexivit.ext.lutq",
    "flexivit.ext.graph",
    "flexivit.ext.bridge",
    "flexivit.ext.bgn",
    "flexivit.ext.proxies",
)
