"""Paper-claim checks, one module per pillar; `trainlab.lab.claims` imports them all."""
