"""Orchestration on top of the stages: the Prefect flow (`pipeline`), the DVC stage runner it uses
(`orchestrate`), the in-process `dvc repro` (`repro`) and the stages called directly without DVC
(`direct`, `loraline run --no-dvc`). Composition only: no stage logic here."""
