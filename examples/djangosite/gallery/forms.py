"""The upload form."""

from django import forms

from .models import Profile


class ProfileForm(forms.ModelForm):
    """A name and an avatar image (Pillow checks that it is one)."""

    class Meta:
        model = Profile
        fields = ("name", "avatar")
