"""The example app: profiles with an avatar, and a thumbnail made from each avatar."""
