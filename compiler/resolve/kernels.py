"""Fused kernels from Axolotl's plugins: which ones the run patches in, and why.

Axolotl turns the Liger kernels on with its LigerPlugin plus one ``liger_*`` key each, and the
cut-cross-entropy loss with its CutCrossEntropyPlugin (``cut_cross_entropy`` defaults to true there).
tunefile carries both out itself (runtime/kernels.py). Both are Triton kernels for CUDA: on a CPU target
they resolve to the plain PyTorch code here, with the reason; a GPU node without the package falls back at
run time, and says so in metrics.jsonl.
"""

from __future__ import annotations

from ..errors import Problem
from ..plan import Decision
from ..spec import CCE_PLUGIN, LIGER_PLUGIN, Spec
from ..targets import Target

LIGER_KEYS = ("liger_rms_norm", "liger_glu_activation", "liger_layer_norm", "liger_rope", "liger_rms_norm_gated",
              "liger_fused_linear_cross_entropy")
KERNEL_KEYS = (*LIGER_KEYS, "cut_cross_entropy")


def resolve_kernels(spec: Spec, target: Target, warnings: list[Problem]) -> tuple[dict[str, bool], list[Decision]]:
    plugins = set(spec.plugins or ())
    wanted = {key: bool(getattr(spec, key)) and LIGER_PLUGIN in plugins for key in LIGER_KEYS}
    wanted["cut_cross_entropy"] = spec.cut_cross_entropy and CCE_PLUGIN in plugins
    for key in LIGER_KEYS:
        if getattr(spec, key) and LIGER_PLUGIN not in plugins:
            warnings.append(Problem((key,), "has no effect without the Liger plugin, as in Axolotl",
                                    hint=f"add `plugins: [{LIGER_PLUGIN}]`"))
    if wanted["cut_cross_entropy"] and wanted["liger_fused_linear_cross_entropy"]:
        # Both replace the same loss; Axolotl refuses the pair as well.
        wanted["liger_fused_linear_cross_entropy"] = False
        warnings.append(Problem(("liger_fused_linear_cross_entropy",), "ignored: cut-cross-entropy already "
                                "computes the loss without logits", hint="keep one of the two"))
    chosen = [key for key, on in wanted.items() if on]
    if not chosen:
        return dict.fromkeys(KERNEL_KEYS, False), []
    if target.on_cpu:
        reason = "Liger and cut-cross-entropy are Triton kernels for CUDA; the target is the CPU"
        return dict.fromkeys(KERNEL_KEYS, False), [Decision("kernels", "PyTorch's own (" + ", ".join(chosen)
                                                             + " not used)", reason)]
    packages = sorted({"cut-cross-entropy" if key == "cut_cross_entropy" else "liger-kernel" for key in chosen})
    return wanted, [Decision("kernels", ", ".join(chosen),
                             "the config's plugins ask for them; a node without " + " or ".join(packages)
                             + " runs PyTorch's code instead and records it")]


def kernel_packages(kernels: dict[str, bool]) -> set[str]:
    packages = set()
    if kernels.get("cut_cross_entropy"):
        packages.add("cut-cross-entropy")
    if any(kernels.get(key) for key in LIGER_KEYS):
        packages.add("liger-kernel")
    return packages
