from common.config import FedLoraConfig
from simulations.baselines import centralized, local_only


def test_centralized_processes_the_federations_samples_and_beats_local_only(banking_subset):
    cfg = FedLoraConfig(data=str(banking_subset), label_column="category", num_clients=3,
                        num_rounds=2, local_steps=3, partition="dirichlet", alpha=0.1)
    pooled = centralized(cfg)
    alone = local_only(cfg)
    assert pooled["steps"] == 2 * 3 * 3
    # Sites that each see a few intents cannot classify all ten; pooled data can.
    assert pooled["accuracy"] > alone["accuracy"] + 0.15
    assert 0 <= alone["accuracy"] <= 1 and alone["loss"] > 0
