"""MD-IQA scorer: network, training, simulation, metrics, physics."""
