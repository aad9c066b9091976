"""The edge: public routes of API.md, token verification, composition of answers. No database."""
