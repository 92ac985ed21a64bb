"""The layout: one small ``gr.Blocks`` with three tabs wired to :class:`dinoserve.app.handlers.Handlers`.

Each tab's main button carries the named API endpoint (``/search``, ``/attention``,
``/embed``); the same handler is also run on upload and on slider release for people in
the browser, with those extra events kept private so the API stays three endpoints.
Events that take an image run with ``preprocess=False``: the handler decodes the upload
itself (:mod:`dinoserve.app.upload`), so a bad file gets a clear message instead of a bare "Error".
"""

from __future__ import annotations

import gradio as gr

from dinoserve.app.handlers import DEFAULT_K, DEFAULT_THRESHOLD, Handlers

#: Largest k the slider offers; an index can be much bigger than a page of thumbnails.
MAX_K = 50

#: How many index images are offered as examples under the search box.
N_EXAMPLES = 4


def example_paths(paths: list[str], n: int = N_EXAMPLES) -> list[str]:
    """``n`` index images spread evenly over the index (so that they differ)."""
    if not paths or n <= 0:
        return []
    step = max(1, len(paths) // n)
    return paths[::step][:n]


def _image_input(**kwargs) -> gr.Image:
    """An image input whose events get the raw upload (see :mod:`dinoserve.app.upload` for why)."""
    return gr.Image(type="filepath", sources=["upload", "clipboard"], height=280, **kwargs)


def _when_image(fn, n_outputs: int):
    """``fn`` for automatic events (upload, slider release): do nothing while no image is
    loaded, instead of showing the "no image" message the buttons give."""

    def run(image, *args):
        if image is None:
            return tuple(gr.skip() for _ in range(n_outputs))
        return fn(image, *args)

    return run


def build_blocks(h: Handlers, *, title: str = "dinoserve") -> gr.Blocks:
    """Lay out the Search, Attention and Embed tabs over ``h``."""
    n = len(h.paths)
    max_k = max(1, min(MAX_K, n))
    m = h.model
    with gr.Blocks(title=title, analytics_enabled=False, delete_cache=(3600, 3600)) as demo:
        gr.Markdown(
            f"# {title}\nModel **{m.name}** ({m.family or 'unknown family'}, "
            f"{m.image_size} px) · index of **{n}** images"
            + (f" under `{h.root}`" if h.root else "")
        )
        with gr.Tabs():
            with gr.Tab("Search", id="search"):
                _search_tab(h, max_k)
            with gr.Tab("Attention", id="attention"):
                _attention_tab(h)
                if h.model.has_patch_tokens:
                    _patch_features(h)
            with gr.Tab("Embed", id="embed"):
                _embed_tab(h)
    return demo


def _search_tab(h: Handlers, max_k: int) -> None:
    with gr.Row():
        with gr.Column(scale=1):
            query = _image_input(label="Query image (upload or paste)", elem_id="search-query")
            k = gr.Slider(1, max_k, value=min(DEFAULT_K, max_k), step=1, label="k: how many neighbours")
            button = gr.Button("Search", variant="primary", elem_id="search-button")
            examples = [e for e in map(h.servable, example_paths(h.paths)) if e]
            picked = None
            if examples:
                picked = gr.Examples([[p] for p in examples], inputs=[query], label="Examples from the index",
                                     elem_id="search-examples")
        with gr.Column(scale=2):
            gallery = gr.Gallery(
                label="Nearest images (rank. cosine similarity  path); click one to search with it",
                elem_id="search-results", columns=4, allow_preview=False, object_fit="contain",
                height="auto", interactive=False,
            )
            table = gr.Dataframe(headers=["rank", "score", "path"], datatype=["number", "number", "str"],
                                 label="Results", interactive=False, elem_id="search-table")
    hit_paths = gr.State([])  # paths of the shown results, kept on the server
    outputs = [gallery, table, hit_paths]
    button.click(h.search, [query, k], outputs, api_name="search", preprocess=False)
    query.upload(_when_image(h.search, 3), [query, k], outputs, api_visibility="private", preprocess=False)
    gallery.select(h.search_from_result, [hit_paths, k], [query, *outputs], api_visibility="private")
    if picked is not None:  # an example, once loaded into the query, is searched at once
        picked.load_input_event.then(_when_image(h.search, 3), [query, k], outputs,
                                     api_visibility="private", preprocess=False)


def _attention_tab(h: Handlers) -> None:
    vit = h.model.has_attention
    if not vit:
        gr.Markdown(f"**{h.no_attention_message()}**", elem_id="attention-unavailable")
    gr.Markdown(
        "Last block's CLS->patch attention, one map per head, upsampled per patch. Each head's map "
        "is renormalised to sum to 1 over the patches (the CLS->CLS weight is left out, so the raw "
        "maps sum to a little less); colours are then stretched per map for display. The threshold "
        "view keeps the smallest set of patches that holds a share t of the attention."
        + (f" This model has {h.model.num_registers} register tokens: they are left out of the maps "
           "too (registers often take much of the CLS attention, so the raw sums can be well below 1)."
           if h.model.num_registers else ""),
        visible=vit, elem_id="attention-about",
    )
    with gr.Row(visible=vit):
        with gr.Column(scale=1):
            image = _image_input(label="Image", elem_id="attention-image")
            threshold = gr.Slider(0.05, 1.0, value=DEFAULT_THRESHOLD, step=0.05,
                                  label="t: share of attention the threshold view keeps")
            button = gr.Button("Show attention", variant="primary", elem_id="attention-button")
        with gr.Column(scale=2):
            mean = gr.Image(label="Mean over heads", type="pil", interactive=False, format="png", height=320,
                            elem_id="attention-mean")
            heads = gr.Gallery(label="Per-head attention", columns=6, format="png", interactive=False,
                               height=None, allow_preview=True, elem_id="attention-heads")
            kept = gr.Gallery(label="Threshold view (mean, then each head)", columns=6, format="png",
                              interactive=False, height=None, elem_id="attention-kept")
            numbers = gr.JSON(label="Numbers (renormalised maps, raw sums, kept patches)", open=False)
    outputs = [heads, mean, kept, numbers]
    button.click(h.attention, [image, threshold], outputs, api_name="attention", preprocess=False)
    image.upload(_when_image(h.attention, 4), [image, threshold], outputs, api_visibility="private", preprocess=False)
    threshold.release(_when_image(h.attention, 4), [image, threshold], outputs, api_visibility="private", preprocess=False)


def _patch_features(h: Handlers) -> None:
    """PCA of the patch tokens to RGB, for any model exported with them (ConvNeXts too)."""
    gr.Markdown("### Patch features\nThe first three principal components of this image's patch tokens "
                "as red, green and blue (registers and CLS left out): patches that look alike to the model "
                "get alike colours.", elem_id="patch-features-about")
    with gr.Row():
        with gr.Column(scale=1):
            image = _image_input(label="Image", elem_id="patch-features-image")
            button = gr.Button("Show patch features", variant="primary", elem_id="patch-features-button")
        with gr.Column(scale=2):
            picture = gr.Image(label="Patch features, PCA to RGB", type="pil", interactive=False, format="png",
                               height=320, elem_id="patch-features-pca")
            numbers = gr.JSON(label="Numbers (grid, explained variance)", open=False)
    button.click(h.patch_features, [image], [picture, numbers], api_name="patch_features", preprocess=False)


def _embed_tab(h: Handlers) -> None:
    with gr.Row():
        with gr.Column(scale=1):
            image = _image_input(label="Image", elem_id="embed-image")
            button = gr.Button("Embed", variant="primary", elem_id="embed-button")
        with gr.Column(scale=2):
            vector = gr.JSON(label=f"L2-normalised embedding ({h.model.name})", elem_id="embed-vector")
            with gr.Row():
                npy = gr.File(label="embedding.npy", interactive=False)
                js = gr.File(label="embedding.json", interactive=False)
    outputs = [vector, npy, js]
    button.click(h.embed, [image], outputs, api_name="embed", preprocess=False)
    image.upload(_when_image(h.embed, 3), [image], outputs, api_visibility="private", preprocess=False)
