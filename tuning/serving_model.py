"""The registered model's pyfunc, as MLflow loads it ("models from code": this file is copied
into the model and run there, so it imports nothing of prunetune).

Input: uint8 images, ``batch x 32 x 32 x 3`` (the signature says so, and MLflow refuses any
other shape or dtype). Output: one row per image: ``label`` (the class index), ``class`` (its
name) and ``prob_<class>`` for every class. The network and its preprocessing are one
TorchScript file (``tuning.deploy.torchscript``).
"""
import json
import warnings

import mlflow
import numpy as np
import pandas as pd
import torch

# the signature (uint8, -1 x 32 x 32 x 3) validates the input; type hints would only repeat it
warnings.filterwarnings("ignore", message=".*Add type hints to the `predict` method")


class ImageClassifier(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # "torch.jit is deprecated": still what loads with torch alone
            self.model = torch.jit.load(context.artifacts["model"], map_location="cpu").eval()
        with open(context.artifacts["classes"]) as f:
            self.classes = json.load(f)

    def predict(self, context, model_input, params=None):
        if isinstance(model_input, dict):  # a request that named its one input
            (model_input,) = model_input.values()
        images = torch.from_numpy(np.ascontiguousarray(model_input, dtype=np.uint8))
        with torch.inference_mode():
            probs = self.model(images).numpy()
        labels = probs.argmax(axis=1)
        out = pd.DataFrame(probs, columns=[f"prob_{c}" for c in self.classes])
        out.insert(0, "label", labels.astype(np.int64))
        out.insert(1, "class", [self.classes[i] for i in labels])
        return out


mlflow.models.set_model(ImageClassifier())
