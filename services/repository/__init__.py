"""The model repository's loader: the folder of models, loading and unloading them with their
checksums verified (repository.py). What a model folder declares, its config.yaml, is the schema
in services/model_config.py, which every part of the server reads without importing backends."""
