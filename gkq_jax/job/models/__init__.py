"""The job's models: the image classifiers of the seeds' experiments (and, with
its transformer modules, pretrained transformers). A new model goes in its own
module here and is named in :func:`create_model`."""

from gkq_jax.job.models.vision import (
           LENET_300_100,
           MLP,
           SPEECH_MLP,
           BasicBlock,
           LeNet5,
           ResNet,
           ResNet34,
           ResNetTiny,
           WideBlock,
           WideResNet,
           create_model,
)

__all__ = ["LENET_300_100", "SPEECH_MLP", "MLP", "BasicBlock", "LeNet5", "ResNet", "ResNet34",
           "ResNetTiny", "WideBlock", "WideResNet", "create_model"]
