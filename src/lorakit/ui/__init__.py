"""lorakit's web page: runs and their curves, adapter reports, and a chat playground over the server's API.

    folders.py   paths a client names, kept inside the runs / adapters folders
    runs.py      run folders under a root: their resolved config, metrics rows, final figures
    adapters.py  adapter folders: listing, the inspection report, subspace similarity of two
    api.py       the page's JSON endpoints (/ui/api/...) and its static files, as one router
    app.py       the page on its own (no model) or mounted on `lorakit serve`'s app
    static/      index.html, app.js, style.css and the vendored uPlot (MIT, see static/uPlot.LICENSE)
"""
