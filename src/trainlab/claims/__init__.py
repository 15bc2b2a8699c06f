"""Paper-claim checks, one module per pillar; `trainlab.claims.registry` imports them all."""
