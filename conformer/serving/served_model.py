"""What MLflow runs to build a logged conformer model ("models from code": the model is this file, not a pickle).

MLflow copies it into the model folder and executes it on load, with the package (`code_paths`) importable.
"""
import mlflow

from conformer.serving.pyfunc_model import ConformerModel

mlflow.models.set_model(ConformerModel())
