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
    "flexivit.ext.norms",
    "flexivit.ext.proxies",
)

# The option families' commands: name -> (driver module, one-line help). The CLI adds a subcommand for each and
# imports its driver (``add_arguments(parser, cli)``, ``run(args, cli)``, ``TRAINS``) only when it runs.
COMMANDS = {
    "compress": ("flexivit.ext.compress", "a compact model derived from a trained FlexiViT (LUT-Q, least-squares "
                 "bridges, trained on its quantised outputs)"),
    "evolve": ("flexivit.ext.evolve", "evolve block graphs guided by their learned connection weights, scored on "
               "the validation split, resumable (docs/evolve.md)"),
    "recalibrate": ("flexivit.ext.recalibrate", "running statistics of batch-statistics norms (model.norm=batchnorm|bgn) "
                    "for new patch sizes, estimated on training images without gradients (docs/batchnorm.md)"),
    "fewshot": ("flexivit.ext.fewshot", "few-shot accuracy of a frozen FlexiViT with class proxies built from each "
                "episode's support set, per method, shot count and patch size (docs/proxies.md)"),
}
