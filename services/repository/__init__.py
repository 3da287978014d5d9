"""The model repository: the folder of models, their config files (model_config.py), and loading
and unloading them with their checksums verified (repository.py)."""
