"""MurmurHash3_x86_128 (seed 0) written from the published algorithm, to check hash.lua."""

def murmur3_x86_128(data: bytes, seed: int = 0) -> str:
    M = 0xFFFFFFFF
    def rotl(x, r): return ((x << r) | (x >> (32 - r))) & M
    def fmix(h):
        h ^= h >> 16; h = (h * 0x85EBCA6B) & M; h ^= h >> 13; h = (h * 0xC2B2AE35) & M; return h ^ (h >> 16)
    c1, c2, c3, c4 = 0x239B961B, 0xAB0E9789, 0x38B34AE5, 0xA1E38B93
    h1 = h2 = h3 = h4 = seed
    n = len(data); nb = n // 16
    for i in range(nb):
        k1, k2, k3, k4 = (int.from_bytes(data[i*16+j*4:i*16+j*4+4], "little") for j in range(4))
        k1 = (k1*c1)&M; k1 = rotl(k1,15); k1=(k1*c2)&M; h1 ^= k1
        h1 = rotl(h1,19); h1=(h1+h2)&M; h1=(h1*5+0x561CCD1B)&M
        k2 = (k2*c2)&M; k2 = rotl(k2,16); k2=(k2*c3)&M; h2 ^= k2
        h2 = rotl(h2,17); h2=(h2+h3)&M; h2=(h2*5+0x0BCAA747)&M
        k3 = (k3*c3)&M; k3 = rotl(k3,17); k3=(k3*c4)&M; h3 ^= k3
        h3 = rotl(h3,15); h3=(h3+h4)&M; h3=(h3*5+0x96CD1C35)&M
        k4 = (k4*c4)&M; k4 = rotl(k4,18); k4=(k4*c1)&M; h4 ^= k4
        h4 = rotl(h4,13); h4=(h4+h1)&M; h4=(h4*5+0x32AC3B17)&M
    tail = data[nb*16:]
    k = [0,0,0,0]
    for j, b in enumerate(tail): k[j//4] |= b << ((j % 4) * 8)
    tl = len(tail)
    if tl > 12: x=(k[3]*c4)&M; x=rotl(x,18); x=(x*c1)&M; h4 ^= x
    if tl > 8: x=(k[2]*c3)&M; x=rotl(x,17); x=(x*c4)&M; h3 ^= x
    if tl > 4: x=(k[1]*c2)&M; x=rotl(x,16); x=(x*c3)&M; h2 ^= x
    if tl > 0: x=(k[0]*c1)&M; x=rotl(x,15); x=(x*c2)&M; h1 ^= x
    h1^=n; h2^=n; h3^=n; h4^=n
    h1=(h1+h2+h3+h4)&M; h2=(h2+h1)&M; h3=(h3+h1)&M; h4=(h4+h1)&M
    h1,h2,h3,h4 = fmix(h1),fmix(h2),fmix(h3),fmix(h4)
    h1=(h1+h2+h3+h4)&M; h2=(h2+h1)&M; h3=(h3+h1)&M; h4=(h4+h1)&M
    return b"".join(h.to_bytes(4,"little") for h in (h1,h2,h3,h4)).hex()
