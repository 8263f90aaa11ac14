"""Training masked-diffusion LMs for canvas decoding (NAP): data curation, LLaDA's SFT
objective, a DDP trainer, and the synthetic task that paradec-tiny is trained on.

    python -m paradec.train data --out DIR            # tokenizer + nap/longcot datasets
    python -m paradec.train fit --data DIR/nap.safetensors --tokenizer DIR/tokenizer --out CKPT
    python -m paradec.train export CKPT DEST --dtype bf16
"""

from paradec.train.data import CanvasFormat, CurationReport, ReasoningExample, curate, longcot_instance, nap_instance
from paradec.train.objective import masked_diffusion_loss
from paradec.train.trainer import TrainConfig, train

__all__ = [
    "CanvasFormat",
    "CurationReport",
    "ReasoningExample",
    "TrainConfig",
    "curate",
    "longcot_instance",
    "masked_diffusion_loss",
    "nap_instance",
    "train",
]
