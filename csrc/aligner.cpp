// Token alignment for Prompt-to-Prompt: word -> token positions, the word-swap
// mapper of Replace, and the Needleman-Wunsch alignment of Refine.
//
// Semantics follow the reference implementation exactly, tie-breaking included:
// google/prompt-to-prompt, ptp_utils.py (get_word_inds) and seq_aligner.py
// (get_replacement_mapper, get_refinement_mapper). tests/test_words.py restates them
// in Python and compares.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

namespace py = pybind11;

#define P2P_CHECK(cond, msg)                              \
    do {                                                  \
        if (!(cond)) throw std::invalid_argument(msg);    \
    } while (0)

namespace {

// Length in Unicode code points of a UTF-8 string, as Python's len() counts it: the
// reference compares character counts, and pybind11 hands us UTF-8 bytes.
size_t utf8_len(const std::string& s) {
    size_t n = 0;
    for (unsigned char c : s) n += (c & 0xC0) != 0x80;
    return n;
}

// Positions (counting BOS, so starting at 1) of the tokens that make up the words
// whose indices are in `word_places`. `words` is the prompt split on single spaces;
// `tokens` the decoded tokens of the prompt without BOS/EOS, with '#' stripped.
std::vector<int64_t> word_token_positions(const std::vector<std::string>& words,
                                          const std::vector<std::string>& tokens,
                                          const std::vector<int64_t>& word_places) {
    std::vector<int64_t> out;
    if (word_places.empty()) return out;
    size_t cur_len = 0;
    size_t ptr = 0;
    for (size_t i = 0; i < tokens.size(); ++i) {
        cur_len += utf8_len(tokens[i]);
        for (int64_t w : word_places) {
            if (w >= 0 && static_cast<size_t>(w) == ptr) {
                out.push_back(static_cast<int64_t>(i) + 1);
                break;
            }
        }
        // A token stream longer than the words (truncation, odd spacing) stops matching here.
        if (ptr < words.size() && cur_len >= utf8_len(words[ptr])) {
            ++ptr;
            cur_len = 0;
        }
    }
    return out;
}

// Needleman-Wunsch with gap 0, match 1, mismatch -1 over token ids; ties prefer
// left (gap in x), then up (gap in y), then diagonal. Returns, for each token of y,
// the index of the x token it aligns with, or -1 where y inserts a token.
std::vector<int64_t> global_align(const std::vector<int64_t>& x, const std::vector<int64_t>& y) {
    const size_t nx = x.size(), ny = y.size();
    const int gap = 0, match = 1, mismatch = -1;
    std::vector<int> score((nx + 1) * (ny + 1), 0);
    // trace: 1 left, 2 up, 3 diagonal, 4 origin
    std::vector<uint8_t> trace((nx + 1) * (ny + 1), 0);
    auto at = [ny](size_t i, size_t j) { return i * (ny + 1) + j; };
    for (size_t j = 1; j <= ny; ++j) {
        score[at(0, j)] = static_cast<int>(j) * gap;
        trace[at(0, j)] = 1;
    }
    for (size_t i = 1; i <= nx; ++i) {
        score[at(i, 0)] = static_cast<int>(i) * gap;
        trace[at(i, 0)] = 2;
    }
    trace[at(0, 0)] = 4;
    for (size_t i = 1; i <= nx; ++i) {
        for (size_t j = 1; j <= ny; ++j) {
            const int left = score[at(i, j - 1)] + gap;
            const int up = score[at(i - 1, j)] + gap;
            const int diag = score[at(i - 1, j - 1)] + (x[i - 1] == y[j - 1] ? match : mismatch);
            int best = left > up ? left : up;
            best = best > diag ? best : diag;
            score[at(i, j)] = best;
            trace[at(i, j)] = best == left ? 1 : (best == up ? 2 : 3);
        }
    }
    std::vector<int64_t> y_to_x(ny, -1);
    size_t i = nx, j = ny;
    while (i > 0 || j > 0) {
        const uint8_t t = trace[at(i, j)];
        if (t == 3) {
            --i;
            --j;
            y_to_x[j] = static_cast<int64_t>(i);
        } else if (t == 1) {
            --j;
            y_to_x[j] = -1;
        } else if (t == 2) {
            --i;
        } else {
            break;
        }
    }
    return y_to_x;
}

// Replace's word mapper, row-major (max_len x max_len). `src_inds`/`tgt_inds` hold,
// for each swapped word in order, its token positions in the source and target.
std::vector<float> replacement_mapper(const std::vector<std::vector<int64_t>>& src_inds,
                                      const std::vector<std::vector<int64_t>>& tgt_inds, int64_t max_len) {
    P2P_CHECK(src_inds.size() == tgt_inds.size(), "replacement_mapper: one target span per source span");
    P2P_CHECK(max_len > 0, "replacement_mapper: max_len must be positive");
    std::vector<float> m(static_cast<size_t>(max_len * max_len), 0.0f);
    auto set = [&](int64_t r, int64_t c, float v) {
        if (r >= 0 && r < max_len && c >= 0 && c < max_len) m[static_cast<size_t>(r * max_len + c)] = v;
    };
    int64_t i = 0, j = 0;
    size_t cur = 0;
    while (i < max_len && j < max_len) {
        if (cur < src_inds.size() && !src_inds[cur].empty() && src_inds[cur][0] == i) {
            const auto& s = src_inds[cur];
            const auto& t = tgt_inds[cur];
            P2P_CHECK(!t.empty(), "replacement_mapper: a swapped target word has no tokens");
            if (s.size() == t.size()) {
                for (size_t k = 0; k < s.size(); ++k) set(s[k], t[k], 1.0f);
            } else {
                const float ratio = 1.0f / static_cast<float>(t.size());
                for (int64_t tt : t)
                    for (int64_t ss : s) set(ss, tt, ratio);
            }
            ++cur;
            i += static_cast<int64_t>(s.size());
            j += static_cast<int64_t>(t.size());
        } else if (cur < src_inds.size()) {
            set(i, j, 1.0f);
            ++i;
            ++j;
        } else {
            // Past the last swap the reference writes the diagonal at j (not i).
            set(j, j, 1.0f);
            ++i;
            ++j;
        }
    }
    return m;
}

}  // namespace

void register_aligner(py::module_& m) {
    m.def("word_token_positions", &word_token_positions, py::arg("words"), py::arg("tokens"),
          py::arg("word_places"),
          "Token positions (BOS counted) of the words at `word_places` of a prompt.");
    m.def("global_align", &global_align, py::arg("x"), py::arg("y"),
          "Needleman-Wunsch alignment of token ids: for each y token, its x index or -1.");
    m.def("replacement_mapper", &replacement_mapper, py::arg("src_inds"), py::arg("tgt_inds"),
          py::arg("max_len") = 77, "Replace's word mapper, row-major max_len x max_len floats.");
}
