"""The chassis: what every service uses and no domain knowledge at all."""
