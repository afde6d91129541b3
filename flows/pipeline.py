"""Entry point that prefect.yaml's deployments name (`flows/pipeline.py:pipeline`).

The flow itself is library code, `loraline.flows.pipeline`, so that `loraline run` can import it from
any folder; this file only makes it findable where Prefect looks for deployments' entry points.
"""

from loraline.flows.pipeline import pipeline

__all__ = ["pipeline"]

if __name__ == "__main__":
    pipeline()
