"""A load, stage by stage: references resolved against a store, a plan of what is missing, the
transfer that fetches and checks every part, and the record of what was placed."""
