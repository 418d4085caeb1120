;; The Guix channels sheepdog's environment is pinned to.
;; Reproduce it anywhere:  guix time-machine -C guix/channels.scm -- shell -m guix/manifest.scm
;; `sheepdog hosts check HOST` compares a host's `guix describe --format=channels` with this.
;; To move the pin, run `guix describe --format=channels > guix/channels.scm` on the
;; reference host (Guix could not be run where this file was written: the commit below
;; is the pin to check against, not one verified here).
(list (channel
        (name 'guix)
        (url "https://git.savannah.gnu.org/git/guix.git")
        (branch "master")
        (commit
          "c5fa9dd0e96493307cc76ea098a6bca9b076e012")
        (introduction
          (make-channel-introduction
            "9edb3f66fd807b096b48283debdcddccfea34bad"
            (openpgp-fingerprint
              "BBB0 2DDF 2CEA F6A8 0D1D  E643 A2A0 6DF2 A33A 54FA")))))
